"""The README and generated files stay true to the code."""

from __future__ import annotations

import ast
import filecmp
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gen_protos  # noqa: E402
import readme_keys  # noqa: E402


def test_readme_key_tables_match_the_schemas() -> None:
    assert readme_keys.current((ROOT / "README.md").read_text()) == readme_keys.tables(), \
        "run: python tools/readme_keys.py --write"


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    gen_protos.generate(tmp_path)
    for name in ("psrt_pb2.py", "psrt_pb2.pyi", "psrt_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "pserver" / name, ROOT / "pserver" / name, shallow=False), \
            f"pserver/{name} is stale: run python tools/gen_protos.py"


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_package_boundaries() -> None:
    assert not _imports("ckpt") & {"pserver", "trainer"}, "ckpt imports nothing of ours"
    assert "trainer" not in _imports("pserver"), "pserver must not import trainer"
    assert "proto" not in _imports("pserver") | _imports("trainer") | _imports("ckpt")
