"""Helpers shared by the benchmarks: start pservers as real processes, time things."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pserver import config as cfg

ROOT = Path(__file__).resolve().parents[1]


def start_pservers(config: cfg.JobConfig, workdir: Path) -> tuple[cfg.JobConfig, list]:
    """Start config.num_pservers `python -m pserver` processes on free ports."""
    procs, addrs = [], []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    overrides = _overrides(config)
    for i in range(config.num_pservers):
        ready = workdir / f"pserver{i}.ready"
        args = [sys.executable, "-m", "pserver", "--id", str(i), "--port", "0",
                "--ready-file", str(ready), "--log-level", "WARNING", *overrides]
        procs.append(subprocess.Popen(args, env=env))
        addrs.append(ready)
    bound = []
    for p, ready in zip(procs, addrs, strict=True):
        bound.append(wait_ready_file(ready, p))
    return dataclasses.replace(config, pservers=tuple(bound)), procs


def _overrides(config: cfg.JobConfig) -> list[str]:
    """--set flags that rebuild `config` in a child (tables, dense, job keys)."""
    out = [f"job.mode=\"{config.mode}\"", f"job.num_trainers={config.num_trainers}",
           f"job.seed={config.seed}", f"job.virtual_shards={config.virtual_shards}",
           "job.pservers=[" + ",".join(f'"{a}"' for a in config.pservers) + "]",
           f"rpc.max_message_bytes={config.rpc.max_message_bytes}"]
    for key in ("tls", "tls_cert", "tls_key", "tls_ca", "token_file"):  # pull_push.py --security
        if getattr(config.rpc, key):
            out.append(f'rpc.{key}="{getattr(config.rpc, key)}"')
    for t in config.tables:
        out += [f"tables.{t.name}.dim={t.dim}", f"tables.{t.name}.optimizer=\"{t.optimizer.kind}\""]
    for d in config.dense:
        out += [f"dense.{d.name}.shape={list(d.shape)}"]
    return [x for o in out for x in ("--set", o)]


def wait_ready_file(path: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before it was ready")
        time.sleep(0.02)
    raise RuntimeError(f"{path} not written in {timeout}s")


def stop(procs: list) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def rate(fn: Callable[[int], None], items_per_call: int, min_time: float = 1.5,
         min_calls: int = 5) -> float:
    """Items per second of fn(i), called until both min_time and min_calls are reached."""
    calls, start = 0, time.perf_counter()
    while True:
        fn(calls)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and calls >= min_calls:
            return calls * items_per_call / elapsed


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="psrt-bench-"))
