"""Unit tests of trainer.models: gradients against finite differences, loss, shapes, config."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pserver.config import ConfigError
from pserver.config.schema import describe_sections, keys, shown_default
from trainer.models import DeepFM, LogisticRegression, Model, ModelConfig, build_model


def make_batch(
    rng: np.random.Generator, n: int, num_slots: int = 26, num_numeric: int = 13
) -> SimpleNamespace:
    return SimpleNamespace(
        labels=(rng.random(n) < 0.4).astype(np.float32),
        numeric=rng.normal(size=(n, num_numeric)).astype(np.float32),
        ids=rng.integers(0, 2**64, size=(n, num_slots), dtype=np.uint64, endpoint=False),
    )


def make_inputs(
    model: Model, batch: SimpleNamespace, rng: np.random.Generator, scale: float = 0.5
) -> tuple[dict, dict]:
    ids = model.slot_ids(batch)
    rows = {
        t: rng.normal(0, scale, ids[t].shape + (d,)).astype(model.dtype)
        for t, d in model.tables().items()
    }
    params = {
        n: rng.normal(0, scale, s).astype(model.dtype) for n, s in model.dense_shapes().items()
    }
    return rows, params


def numeric_grad(
    model: Model, batch, rows: dict, params: dict, array: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """Central differences of the loss w.r.t. every element of `array` (edited in place)."""
    out = np.zeros_like(array)
    for i in np.ndindex(array.shape):
        old = array[i]
        array[i] = old + eps
        up = model.forward_backward(batch, rows, params, compute_grads=False).loss
        array[i] = old - eps
        down = model.forward_backward(batch, rows, params, compute_grads=False).loss
        array[i] = old
        out[i] = (up - down) / (2 * eps)
    return out


def assert_gradients(model: Model, batch, rows: dict, params: dict) -> None:
    res = model.forward_backward(batch, rows, params)
    assert set(res.row_grads) == set(model.tables())
    assert set(res.dense_grads) == set(model.dense_shapes())
    checked = [(f"rows {t}", rows[t], res.row_grads[t]) for t in rows]
    checked += [(f"dense {n}", params[n], res.dense_grads[n]) for n in params]
    for what, array, grad in checked:
        assert grad.shape == array.shape and grad.dtype == np.float64, what
        num = numeric_grad(model, batch, rows, params, array)
        rel = np.linalg.norm(grad - num) / max(np.linalg.norm(grad) + np.linalg.norm(num), 1e-12)
        assert rel < 1e-5, f"{what}: relative error {rel:.2e}"
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-9, err_msg=what)
        assert np.abs(num).max() > 1e-6, f"{what}: gradient is all zero, check is vacuous"


def test_lr_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(1)
    model = LogisticRegression(num_slots=6, num_numeric=4, dtype=np.float64)
    batch = make_batch(rng, 5, 6, 4)
    rows, params = make_inputs(model, batch, rng)
    assert_gradients(model, batch, rows, params)


def test_deepfm_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(2)
    model = DeepFM(
        num_slots=5, num_numeric=3, embedding_dim=3, slot_groups=2, hidden=(6, 4), dtype=np.float64
    )
    assert model.tables() == {"emb_0": 3, "emb_1": 3, "wide": 1}
    batch = make_batch(rng, 4, 5, 3)
    assert {t: v.shape for t, v in model.slot_ids(batch).items()} == {
        "emb_0": (4, 3),
        "emb_1": (4, 2),
        "wide": (4, 5),
    }
    rows, params = make_inputs(model, batch, rng)
    assert_gradients(model, batch, rows, params)


@pytest.mark.parametrize("hidden", [(), (5,)])
def test_deepfm_gradients_other_shapes(hidden: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    model = DeepFM(
        num_slots=4,
        num_numeric=2,
        embedding_dim=2,
        slot_groups=3,
        hidden=hidden,
        use_wide=False,
        use_numeric=False,
        dtype=np.float64,
    )
    batch = make_batch(rng, 3, 4, 2)
    rows, params = make_inputs(model, batch, rng)
    assert_gradients(model, batch, rows, params)


def test_float32_agrees_with_float64_and_stays_float32() -> None:
    rng = np.random.default_rng(4)
    m32 = DeepFM(embedding_dim=4, slot_groups=3, hidden=(8, 4))
    m64 = DeepFM(embedding_dim=4, slot_groups=3, hidden=(8, 4), dtype=np.float64)
    batch = make_batch(rng, 16)
    rows, params = make_inputs(m32, batch, rng, scale=0.1)
    r32 = m32.forward_backward(batch, rows, params)
    r64 = m64.forward_backward(batch, rows, params)
    outs32 = [r32.probs, r32.logits, *r32.row_grads.values(), *r32.dense_grads.values()]
    assert all(a.dtype == np.float32 for a in outs32)
    assert isinstance(r32.loss, float)
    assert r32.loss == pytest.approx(r64.loss, rel=1e-5)
    for name, g in {**r64.row_grads, **r64.dense_grads}.items():
        g32 = {**r32.row_grads, **r32.dense_grads}[name]
        np.testing.assert_allclose(g32, g, rtol=1e-3, atol=1e-6, err_msg=name)


def test_reference_configuration_shapes() -> None:
    model = DeepFM(
        embedding_dim=16,
        slot_groups=1,
        hidden=(64, 32),
        use_fm=False,
        use_wide=False,
        use_numeric=False,
    )
    assert model.tables() == {"emb_0": 16}
    assert model.dense_shapes() == {
        "mlp_w0": (416, 64),
        "mlp_b0": (64,),
        "mlp_w1": (64, 32),
        "mlp_b1": (32,),
        "mlp_w2": (32, 1),
        "mlp_b2": (1,),
        "bias": (1,),
    }
    rng = np.random.default_rng(5)
    batch = make_batch(rng, 512)
    ids = model.slot_ids(batch)
    assert ids["emb_0"].dtype == np.uint64 and np.array_equal(ids["emb_0"], batch.ids)
    rows, params = make_inputs(model, batch, rng, scale=0.1)
    res = model.forward_backward(batch, rows, params)
    assert res.row_grads["emb_0"].shape == (512, 26, 16)
    assert res.row_grads["emb_0"].dtype == np.float32
    assert {n: g.shape for n, g in res.dense_grads.items()} == model.dense_shapes()


def test_loss_matches_direct_logloss_and_probs_are_probabilities() -> None:
    rng = np.random.default_rng(6)
    for model in (LogisticRegression(), DeepFM()):
        batch = make_batch(rng, 64)
        rows, params = make_inputs(model, batch, rng, scale=0.2)
        res = model.forward_backward(batch, rows, params)
        p, y = res.probs.astype(np.float64), batch.labels.astype(np.float64)
        direct = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        assert res.loss == pytest.approx(direct, rel=1e-5)
        assert np.all((res.probs > 0) & (res.probs < 1))
        np.testing.assert_array_equal(model.predict(batch, rows, params), res.probs)


def test_loss_is_finite_for_huge_logits() -> None:
    model = LogisticRegression(num_slots=2, use_numeric=False)
    batch = SimpleNamespace(
        labels=np.array([0, 1, 1, 0], np.float32), numeric=None, ids=np.zeros((4, 2), np.uint64)
    )
    rows = {"lr_w": np.zeros((4, 2, 1), np.float32)}
    res = model.forward_backward(batch, rows, {"lr_bias": np.array([1e4], np.float32)})
    assert res.loss == pytest.approx(0.5e4, rel=1e-6)  # two of four wrong by a logit of 1e4
    assert np.all(np.isfinite(res.dense_grads["lr_bias"]))


def test_outputs_are_deterministic() -> None:
    rng = np.random.default_rng(7)
    model = DeepFM(slot_groups=2)
    batch = make_batch(rng, 32)
    rows, params = make_inputs(model, batch, rng, scale=0.2)
    a = model.forward_backward(batch, rows, params)
    b = model.forward_backward(batch, rows, params)
    assert a.loss == b.loss
    for x, y in zip(
        [a.probs, *a.row_grads.values(), *a.dense_grads.values()],
        [b.probs, *b.row_grads.values(), *b.dense_grads.values()],
        strict=True,
    ):
        assert x.tobytes() == y.tobytes()


def test_bad_inputs_name_the_problem() -> None:
    rng = np.random.default_rng(8)
    model = DeepFM(embedding_dim=4)
    batch = make_batch(rng, 8)
    rows, params = make_inputs(model, batch, rng)
    with pytest.raises(ValueError, match=r"^forward_backward: table 'emb_0' rows have shape"):
        model.forward_backward(batch, {**rows, "emb_0": rows["emb_0"][:, :, :2]}, params)
    with pytest.raises(ValueError, match=r"^predict: missing dense variable 'bias'"):
        model.predict(batch, rows, {n: p for n, p in params.items() if n != "bias"})
    with pytest.raises(ValueError, match=r"^slot_ids: batch.ids has shape \(8, 3\)"):
        model.slot_ids(SimpleNamespace(ids=batch.ids[:, :3]))


def synthetic_data(rng: np.random.Generator, n: int, num_slots: int, vocab: int) -> SimpleNamespace:
    """Labels a hidden linear function of the ids decides: separable by construction."""
    values = rng.integers(0, vocab, size=(n, num_slots))
    truth = rng.normal(size=(num_slots, vocab))
    score = truth[np.arange(num_slots), values].sum(axis=1)
    ids = (values + 1000 * np.arange(num_slots)).astype(np.uint64)
    return SimpleNamespace(
        labels=(score > np.median(score)).astype(np.float32),
        numeric=rng.normal(size=(n, 2)).astype(np.float32),
        ids=ids,
    )


def gather(model: Model, store: dict, batch, rng: np.random.Generator) -> dict:
    """Rows of slot_ids(batch) from a dict of rows keyed by id, creating missing rows."""
    out = {}
    for t, ids in model.slot_ids(batch).items():
        dim, table = model.tables()[t], store.setdefault(t, {})
        for i in ids.ravel().tolist():
            if i not in table:
                table[i] = rng.normal(0, 0.05, dim).astype(np.float32)
        out[t] = np.stack([table[i] for i in ids.ravel().tolist()]).reshape(*ids.shape, dim)
    return out


def sgd_losses(model: Model, steps: int, lr: float, seed: int) -> tuple[float, float]:
    """Full-data loss before and after `steps` of plain SGD on minibatches of 32."""
    rng = np.random.default_rng(seed)
    data = synthetic_data(rng, 256, model.num_slots, vocab=8)
    params = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in model.dense_shapes().items()}
    store: dict = {}
    before = model.forward_backward(data, gather(model, store, data, rng), params, False).loss
    for step in range(steps):
        sl = slice(step * 32 % 256, step * 32 % 256 + 32)
        batch = SimpleNamespace(labels=data.labels[sl], numeric=data.numeric[sl], ids=data.ids[sl])
        res = model.forward_backward(batch, gather(model, store, batch, rng), params)
        for t, ids in model.slot_ids(batch).items():
            grads = res.row_grads[t].reshape(-1, model.tables()[t])
            for i, g in zip(ids.ravel().tolist(), grads, strict=True):
                store[t][i] -= lr * g
        for n, g in res.dense_grads.items():
            params[n] -= lr * g
    after = model.forward_backward(data, gather(model, store, data, rng), params, False).loss
    return before, after


@pytest.mark.parametrize(
    "model",
    [
        LogisticRegression(num_slots=4, num_numeric=2),
        DeepFM(num_slots=4, num_numeric=2, embedding_dim=4, slot_groups=2, hidden=(8,)),
    ],
    ids=["lr", "deepfm"],
)
def test_sgd_lowers_the_loss(model: Model) -> None:
    before, after = sgd_losses(model, steps=300, lr=2.0, seed=9)
    assert after < 0.5 * before, (before, after)


def test_build_model_defaults_and_kinds() -> None:
    model = build_model({})
    assert isinstance(model, DeepFM)
    defaults = {k.name: shown_default(k) for k in keys(ModelConfig)}
    assert defaults == {
        "kind": "deepfm",
        "embedding_dim": 8,
        "slot_groups": 1,
        "hidden": [64, 32],
        "use_fm": True,
        "use_wide": True,
        "use_numeric": True,
    }
    assert model.tables() == {"emb_0": 8, "wide": 1}
    assert model.dense_shapes()["mlp_w0"] == (26 * 8 + 13, 64)
    lr = build_model({"kind": "lr", "use_numeric": False})
    assert isinstance(lr, LogisticRegression)
    assert lr.dense_shapes() == {"lr_bias": (1,)}
    ref = build_model(
        {
            "embedding_dim": 16,
            "use_fm": False,
            "use_wide": False,
            "use_numeric": False,
            "hidden": [64, 32],
        }
    )
    assert ref.dense_shapes()["mlp_w0"] == (416, 64) and ref.tables() == {"emb_0": 16}
    assert build_model({"slot_groups": 4}).tables()["emb_3"] == 8
    text = describe_sections([("model", ModelConfig)])
    assert all(f"  {k.name} (" in text for k in keys(ModelConfig))


@pytest.mark.parametrize(
    ("section", "prefix", "detail"),
    [
        ({"embeding_dim": 8}, "model.embeding_dim: ", "unknown key"),
        ({"embedding_dim": "8"}, "model.embedding_dim: ", "expected int, got str '8'"),
        ({"embedding_dim": True}, "model.embedding_dim: ", "expected int, got bool True"),
        ({"embedding_dim": 0}, "model.embedding_dim: ", "expected an int > 0, got 0"),
        ({"hidden": [64, "32"]}, "model.hidden: ", "expected a list of ints > 0"),
        ({"hidden": 64}, "model.hidden: ", "got int 64"),
        ({"use_fm": 1}, "model.use_fm: ", "expected bool, got int 1"),
        ({"kind": "fm"}, "model.kind: ", "expected one of lr, deepfm, got 'fm'"),
        ({"kind": 3}, "model.kind: ", "expected str, got int 3"),
        ({"slot_groups": 27}, "model.slot_groups: ", "expected at most 26"),
    ],
)
def test_build_model_errors(section: dict, prefix: str, detail: str) -> None:
    with pytest.raises(ValueError) as err:
        build_model(section)
    assert isinstance(err.value, ConfigError)
    assert str(err.value).startswith(prefix), str(err.value)
    assert detail in str(err.value)


def test_inputs_are_never_written() -> None:
    rng = np.random.default_rng(10)
    model = DeepFM(embedding_dim=4, slot_groups=2, hidden=(8,))
    batch = make_batch(rng, 8)
    rows, params = make_inputs(model, batch, rng)
    for a in [*rows.values(), *params.values(), batch.labels, batch.numeric, batch.ids]:
        a.setflags(write=False)  # as rows decoded straight from the wire are
    model.forward_backward(batch, rows, params)
