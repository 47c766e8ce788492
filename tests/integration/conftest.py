"""Integration tier: real servers in this process on port 0 (the `Cluster` of
tests/helpers.py, gRPC clients of it, an S3 server of moto), no child processes."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration `integration` (this hook is given every
    collected test)."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)
