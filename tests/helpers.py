"""Shared by every tier: job configs, in-process pservers on port 0, generated data, the
environment of child processes, and waiting on the ready file a child writes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pserver import config as cfg
from pserver.rpc.client import PSClient
from pserver.rpc.server import Pserver, create_server
from trainer.demo import demo_job

ROOT = Path(__file__).resolve().parents[1]


def job(num_pservers: int = 1, mode: str = "sync", num_trainers: int = 1,
        **sections: Any) -> cfg.JobConfig:
    """A job config for tests; pservers on 127.0.0.1 port 0 until `start_pservers` binds them."""
    raw: dict[str, Any] = {
        "job": {"mode": mode, "num_trainers": num_trainers,
                "pservers": ["127.0.0.1:0"] * num_pservers},
        "tables": {"emb": {"dim": 8}},
        "dense": {"w": {"shape": [4, 3]}, "b": {"shape": [3]}},
    }
    for k, v in sections.items():
        raw[k] = v
    return cfg.build(raw)


class Cluster:
    """In-process pservers on free ports and the bound config clients should use."""

    def __init__(self, config: cfg.JobConfig) -> None:
        first = create_server(config, 0, port=0)  # hosts the coordinator: the others join it
        joined = dataclasses.replace(
            config, pservers=(f"127.0.0.1:{first.port}", *config.pservers[1:]))
        self.servers: list[Pserver] = [first] + [
            create_server(joined, i, port=0) for i in range(1, config.num_pservers)
        ]
        addrs = tuple(f"127.0.0.1:{s.port}" for s in self.servers)
        self.config = dataclasses.replace(config, pservers=addrs)
        self.clients: list[PSClient] = []

    def client(self, trainer_id: int = 0) -> PSClient:
        c = PSClient(self.config, trainer_id)
        c.wait_ready(10)
        self.clients.append(c)
        return c

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        for s in self.servers:
            s.stop(0)


def generated_data(factory: pytest.TempPathFactory, name: str, examples: int,
                   seed: int) -> Path:
    """A directory with train.txt and train.holdout.txt (10% held out) from the generator."""
    from trainer.datagen import generate

    d = factory.mktemp(name)
    generate(d / "train.txt", examples, seed=seed, holdout_fraction=0.1,
             holdout_path=d / "train.holdout.txt")
    return d


SMALL_MODEL = {"kind": "deepfm", "embedding_dim": 4, "slot_groups": 2, "hidden": [8],
               "use_fm": True, "use_wide": True, "use_numeric": True}


def small_job(data_dir: Path, num_pservers: int = 1, num_trainers: int = 1,
              mode: str = "sync", epochs: int = 1) -> cfg.JobConfig:
    """The demo job on `data_dir` with a small DeepFM, batches of 128, no checkpoints."""
    raw = demo_job(str(data_dir / "train.txt"), str(data_dir / "train.holdout.txt"),
                   num_pservers, num_trainers, epochs, SMALL_MODEL)
    raw["job"]["mode"] = mode
    raw["trainer"].update(batch_size=128, progress="off")
    raw.pop("checkpoint")
    return cfg.build(raw)


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def wait_file(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """Wait for a ready file a child process writes; fail early if the child died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited with {proc.returncode} before ready: {out}")
        time.sleep(0.02)
    raise AssertionError(f"{path} not written within {timeout}s")
