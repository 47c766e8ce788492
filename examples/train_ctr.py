"""Train a CTR model from your own script with the guide's API.

    python examples/train_ctr.py [WORKDIR]

Generates a small synthetic Criteo-format data set, writes a job file for a
DeepFM, and trains it stand-alone with `Trainer(..., checkpoint_config=...)`,
printing held-out metrics after each epoch. For a distributed job, start the
pservers (`python -m pserver --id I --config job.toml`) and construct the
Trainer with `trainer_id=J` instead of `standalone=True`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ckpt import CheckpointConfig
from trainer.datagen import generate
from trainer.demo import demo_job, dump_toml
from trainer.loop import EndEpochEvent, Trainer


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example")
    workdir.mkdir(parents=True, exist_ok=True)
    train, holdout = workdir / "train.txt", workdir / "test.txt"
    result = generate(train, 60_000, seed=7, holdout_fraction=0.1, holdout_path=holdout)
    job = workdir / "job.toml"
    doc = demo_job(train.name, holdout.name, num_pservers=1, num_trainers=1, epochs=2)
    doc["trainer"]["progress"] = "off"
    job.write_text(dump_toml(doc))

    config = CheckpointConfig(checkpoint_dir=str(workdir / "ckpt"), max_num_checkpoints=2,
                              epoch_interval=2, step_interval=10)
    trainer = Trainer(job, standalone=True, checkpoint_config=config)

    def on_event(event: object) -> None:
        if isinstance(event, EndEpochEvent):
            m = event.metrics
            print(f"epoch {event.epoch}: held-out logloss {m['logloss']:.4f}, "
                  f"AUC {m['auc']:.4f} (best achievable {result.oracle_auc:.4f})")

    trainer.train(num_epochs=2, event_handler=on_event)


if __name__ == "__main__":
    main()
