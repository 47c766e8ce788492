"""The built-in demo job: synthetic Criteo-format data and a job file for it.

`prepare(workdir)` writes, once, `train.txt` and `train.holdout.txt` (600,000
examples from a hidden ground-truth model, `trainer.datagen`, 10% held out),
`oracle.json` (the hidden model's own held-out AUC: the best achievable), and
`job.toml`: 2 pservers and
2 trainers on loopback in sync mode, a small DeepFM, checkpoints in
./checkpoints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trainer.config import job_sections_for
from trainer.datagen import GeneratorConfig, generate
from trainer.models import build_model

log = logging.getLogger(__name__)

DEMO_EXAMPLES = 600_000
# The demo's hidden model: 3,000 values per slot, so that 2 epochs of 540,000
# examples can learn most of what the hidden model knows.
DEMO_DATA = GeneratorConfig(vocab_size=3_000)
MODEL = {"kind": "deepfm", "embedding_dim": 8, "slot_groups": 2, "hidden": [64, 32],
         "use_fm": True, "use_wide": True, "use_numeric": True}


def demo_job(train: str, holdout: str, num_pservers: int = 2, num_trainers: int = 2,
             epochs: int = 2, model: dict | None = None) -> dict[str, Any]:
    """The demo's job file as a dict (also used by tests, with smaller data)."""
    model = dict(model or MODEL)
    job: dict[str, Any] = {
        "job": {"name": "demo", "mode": "sync", "seed": 0, "num_trainers": num_trainers,
                "pservers": ["127.0.0.1:0"] * num_pservers},
        "trainer": {"epochs": epochs, "batch_size": 512},
        "data": {"train_path": train, "eval_path": holdout},
        "model": model,
        "checkpoint": {"checkpoint_dir": "checkpoints", "max_num_checkpoints": 3,
                       "epoch_interval": 1, "step_interval": 100},
    }
    job.update(job_sections_for(build_model(model),
                                table_opts={"optimizer": "adagrad", "learning_rate": 0.05,
                                            "initial_accumulator": 0.001},
                                dense_opts={"optimizer": "adam", "learning_rate": 0.001}))
    return job


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (in a list: checkpoint.faults)
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} to TOML")


def dump_toml(doc: dict[str, Any]) -> str:
    """TOML text for a job dict: sections of scalars and lists (of scalars or inline tables),
    one level of [a.b] tables."""
    out: list[str] = []
    for section, body in doc.items():
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if scalars or not body:
            out.append(f"[{section}]")
            out += [f"{k} = {_value(v)}" for k, v in scalars.items()]
            out.append("")
        for name, sub in body.items():
            if isinstance(sub, dict):
                out.append(f"[{section}.{name}]")
                out += [f"{k} = {_value(v)}" for k, v in sub.items()]
                out.append("")
    return "\n".join(out)


def prepare(workdir: Path, examples: int = DEMO_EXAMPLES) -> Path:
    """Make the demo's data and job file in `workdir` (once); returns the job file."""
    workdir.mkdir(parents=True, exist_ok=True)
    train, holdout = workdir / "train.txt", workdir / "train.holdout.txt"
    oracle = workdir / "oracle.json"
    if not (train.exists() and holdout.exists() and oracle.exists()):
        log.info("demo: generating %d examples into %s", examples, workdir)
        res = generate(train, examples, seed=0, holdout_fraction=0.1, holdout_path=holdout,
                       config=DEMO_DATA)
        oracle.write_text(json.dumps({"oracle_auc": res.oracle_auc,
                                      "oracle_logloss": res.oracle_logloss}) + "\n")
    job = workdir / "job.toml"
    job.write_text("# The psrt demo job (written by `python -m trainer launch`).\n"
                   + dump_toml(demo_job(train.name, holdout.name)))
    return job
