"""The training loop: determinism, stand-alone vs distributed, the Trainer API."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckpt import CheckpointConfig
from pserver import config as cfg
from tests.conftest import generated_data
from trainer.demo import demo_job
from trainer.loop import BeginEpochEvent, EndEpochEvent, EndStepEvent, Trainer

SMALL_MODEL = {"kind": "deepfm", "embedding_dim": 4, "slot_groups": 2, "hidden": [8],
               "use_fm": True, "use_wide": True, "use_numeric": True}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "data", 4000, seed=1)


def small_job(data_dir: Path, num_pservers: int = 1, num_trainers: int = 1,
              mode: str = "sync", epochs: int = 1) -> cfg.JobConfig:
    raw = demo_job(str(data_dir / "train.txt"), str(data_dir / "train.holdout.txt"),
                   num_pservers, num_trainers, epochs, SMALL_MODEL)
    raw["job"]["mode"] = mode
    raw["trainer"].update(batch_size=128, progress="off")
    raw.pop("checkpoint")
    return cfg.build(raw)


def run_distributed(cluster_factory: Any, job: cfg.JobConfig) -> dict[str, np.ndarray]:
    cluster = cluster_factory(job)
    trainers = [Trainer(cluster.config, j) for j in range(job.num_trainers)]
    errors: list[BaseException] = []

    def work(t: Trainer) -> None:
        try:
            t.train()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in trainers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    params = trainers[0].parameters()
    for t in trainers:
        t.close()
    return params


def assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def test_standalone_equals_one_pserver_one_trainer_sync(data_dir: Path,
                                                        cluster_factory: Any) -> None:
    job = small_job(data_dir)
    alone = Trainer(job, standalone=True)
    alone.train()
    expected = alone.parameters()
    got = run_distributed(cluster_factory, job)
    assert_identical(expected, got)


def test_two_sync_runs_with_the_same_seeds_are_bit_identical(data_dir: Path,
                                                             cluster_factory: Any) -> None:
    job = small_job(data_dir, num_pservers=2, num_trainers=2)
    first = run_distributed(cluster_factory, job)
    second = run_distributed(cluster_factory, job)
    assert_identical(first, second)
    alone = Trainer(job, standalone=True)
    alone.train()
    # a different run (one trainer) really does give different parameters
    assert alone.parameters()["dense/bias"].tobytes() != first["dense/bias"].tobytes()


def test_async_mode_trains(data_dir: Path, cluster_factory: Any) -> None:
    job = small_job(data_dir, num_pservers=2, num_trainers=2, mode="async", epochs=2)
    params = run_distributed(cluster_factory, job)
    assert all(np.isfinite(v).all() for v in params.values())


def test_trainer_api_events_and_learning(data_dir: Path) -> None:
    job = small_job(data_dir, epochs=2)
    config = CheckpointConfig(checkpoint_dir=str(data_dir / "ckpt"), max_num_checkpoints=2,
                              epoch_interval=2, step_interval=10)
    trainer = Trainer(job, standalone=True, checkpoint_config=config)
    before = trainer.evaluate()
    events: list[Any] = []
    metrics = trainer.train(2, events.append)
    begins = [e.epoch for e in events if isinstance(e, BeginEpochEvent)]
    ends = [e for e in events if isinstance(e, EndEpochEvent)]
    steps = [e for e in events if isinstance(e, EndStepEvent)]
    assert begins == [0, 1] and [e.epoch for e in ends] == [0, 1]
    assert len(steps) == 2 * trainer.reader.steps_per_epoch
    assert steps[-1].global_step == len(steps)
    assert metrics["auc"] > before["auc"] + 0.02
    assert metrics["logloss"] < before["logloss"]


def test_checkpoint_config_is_validated(data_dir: Path) -> None:
    job = small_job(data_dir)
    with pytest.raises(TypeError, match="checkpoint_config"):
        Trainer(job, standalone=True, checkpoint_config={"checkpoint_dir": "x"})  # type: ignore
    with pytest.raises(ValueError, match="step_interval"):
        CheckpointConfig(checkpoint_dir="x", step_interval=0)


def test_trainer_id_out_of_range(data_dir: Path) -> None:
    with pytest.raises(cfg.ConfigError, match=r"--id: trainer id 3 is out of range 0..1"):
        Trainer(small_job(data_dir, num_trainers=2), 3)


def test_model_and_tables_must_fit(data_dir: Path) -> None:
    raw = demo_job(str(data_dir / "train.txt"), str(data_dir / "train.holdout.txt"), 1, 1, 1,
                   SMALL_MODEL)
    raw["tables"]["emb_0"]["dim"] = 5
    with pytest.raises(cfg.ConfigError, match=r"tables.emb_0.dim: model 'deepfm' needs dim 4"):
        Trainer(cfg.build(raw), standalone=True)
    del raw["tables"]["emb_0"]
    with pytest.raises(cfg.ConfigError, match=r"tables.emb_0: model 'deepfm' needs a table"):
        Trainer(cfg.build(raw), standalone=True)
