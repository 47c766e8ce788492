"""Unit tier: pure numpy and file logic in this process (no servers, no child processes,
no sockets). `python -m pytest -q tests/unit` runs it in well under a minute."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/unit `unit` (this hook is given every collected test)."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.unit)
