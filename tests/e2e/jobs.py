"""A job run as real processes: write its job file, launch it (and watch it, or run it to
the end), find one of its processes, read the final state of its checkpoints, compare two runs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ckpt import reader
from ckpt.local import LocalStorage
from ckpt.storage import Storage
from tests.helpers import python_env
from trainer.demo import demo_job, dump_toml

MODEL = {"kind": "deepfm", "embedding_dim": 4, "slot_groups": 2, "hidden": [8],
         "use_fm": True, "use_wide": True, "use_numeric": True}
# the file each pserver writes midway through its part (after emb_0's index)
MIDWAY = "*/__lockup_table__/table_pserver_*/emb_0.values"


def slow_saves(seconds: float) -> list[dict]:
    """checkpoint.faults: every pserver's save waits `seconds` midway, so that a test can
    kill a process there (or later triggers come while it is written)."""
    return [{"kind": "slow", "seconds": seconds, "op": "write", "path": MIDWAY}]


def full_disk(serial: int) -> list[dict]:
    """checkpoint.faults: the pservers' part of checkpoint `serial` fails midway, as on a
    full disk."""
    return [{"kind": "enospc", "op": "write", "path": f"checkpoint_{serial}/{MIDWAY[2:]}"}]


def without_faults(env: dict[str, str]) -> dict[str, str]:
    """The environment of a job run again without the faults of its job file."""
    return {**env, "PSRT_CHECKPOINT__FAULTS": "[]"}


def write_job(data_dir: Path, workdir: Path, ckdir: Path, num_pservers: int = 2,
              num_trainers: int = 2, epochs: int = 2, recovery: dict | None = None,
              **checkpoint: Any) -> Path:
    doc = demo_job(str(data_dir / "train.txt"), str(data_dir / "train.holdout.txt"),
                   num_pservers, num_trainers, epochs, MODEL)
    doc["trainer"].update(batch_size=128, progress="log", log_every=1)
    doc["checkpoint"] = {"checkpoint_dir": str(ckdir), "max_num_checkpoints": 3,
                         "epoch_interval": 1, "step_interval": 4, **checkpoint}
    doc["recovery"] = {"heartbeat_s": 0.2, "liveness_timeout_s": 2.0, **(recovery or {})}
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "job.toml"
    path.write_text(dump_toml(doc))
    return path


def launch(job: Path, timeout: float = 300, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "launch", "--config", str(job)],
                            cwd=job.parent, env=env or python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


class Running:
    """A launched job whose output is collected as it comes (its pipe never fills); as a
    context, the launcher is killed at the end if it still runs."""

    def __init__(self, job: Path, env: dict | None = None) -> None:
        self.proc = launch(job, env=env)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                         daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def until_committed(self, ckdir: Path, serial: int, timeout: float = 120) -> None:
        """Wait until checkpoint `serial` is committed; the job must go on running."""
        deadline = time.monotonic() + timeout
        while not (ckdir / f"checkpoint_{serial}" / "_SUCCESS").exists():
            assert time.monotonic() < deadline and self.proc.poll() is None, \
                self.output[-3000:]
            time.sleep(0.02)

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(60)


def run_to_end(job: Path, env: dict | None = None) -> str:
    p = launch(job, env=env)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return out


def pid_of(job: Path, role: str, ident: int) -> int:
    """The pid of the `role` process (pserver or trainer) with --id `ident` of `job`."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if str(job) in args and role in args and "--id" in args and \
                args[args.index("--id") + 1] == str(ident):
            return int(d.name)
    raise AssertionError(f"no {role} {ident} process")


def final_state(where: Path | Storage) -> dict[str, dict[str, np.ndarray]]:
    """Every array of the newest complete checkpoint in `where` (a local directory or a
    store), which must be the final one."""
    storage = where if isinstance(where, Storage) else LocalStorage(where)
    manifest = reader.newest_complete(storage)
    assert manifest is not None and manifest.final
    return reader.read_all(storage, manifest)


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys(), k
        for name in a[k]:
            assert a[k][name].tobytes() == b[k][name].tobytes(), f"{k}/{name} differs"
