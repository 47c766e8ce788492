"""End-to-end tier: real processes (`python -m pserver`, `python -m trainer`, `python -m
ckpt`, scripts, docker compose). Helpers for a job run as processes are in tests/e2e/jobs.py,
the compose stack in tests/e2e/dockerstack.py."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.jobs import final_state, run_to_end, write_job
from tests.helpers import generated_data, python_env

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e `e2e` (this hook is given every collected test)."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data of the end-to-end jobs (tests/e2e/jobs.py write_job): 3,000 examples."""
    return generated_data(tmp_path_factory, "ckdata", 3000, seed=5)


@pytest.fixture(scope="session")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final parameters of write_job's job never interrupted, saving full checkpoints
    only (full_every = 1): what every interrupted or resumed run must end with."""
    work = tmp_path_factory.mktemp("reference")
    run_to_end(write_job(data_dir, work, work / "ckpt"))
    return final_state(work / "ckpt")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start `python -m ...` processes; kills whatever is left at the end."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, *args], env=kw.pop("env", python_env()),
                             cwd=kw.pop("cwd", tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        if p.stdout:
            p.stdout.close()
