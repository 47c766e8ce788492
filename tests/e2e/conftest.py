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

from tests.helpers import python_env

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e `e2e` (this hook is given every collected test)."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


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
