"""The training loop in one process (stand-alone, no server): the Trainer API, its events
and learning, and what it refuses (against pservers: tests/integration/test_training.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ckpt import CheckpointConfig
from pserver import config as cfg
from tests.helpers import SMALL_MODEL, generated_data, small_job
from trainer.demo import demo_job
from trainer.loop import BeginEpochEvent, EndEpochEvent, EndStepEvent, Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "data", 4000, seed=1)


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
