"""The README, the generated files and the package boundaries stay true to the code."""

from __future__ import annotations

import ast
import filecmp
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gen_protos  # noqa: E402
import readme_keys  # noqa: E402

OURS = ("pserver", "trainer", "ckpt")
LAZY_OK = {"matplotlib", "s3fs"}  # heavy optional dependencies, imported where used


def test_readme_key_tables_match_the_schemas() -> None:
    assert readme_keys.current((ROOT / "README.md").read_text()) == readme_keys.tables(), \
        "run: python tools/readme_keys.py --write"


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    gen_protos.generate(tmp_path)
    for name in ("psrt_pb2.py", "psrt_pb2.pyi"):
        got, have = tmp_path / "pserver" / "wire" / name, ROOT / "pserver" / "wire" / name
        assert filecmp.cmp(got, have, shallow=False), \
            f"pserver/wire/{name} is stale: run python tools/gen_protos.py"
    assert sorted(p.name for p in (tmp_path / "pserver" / "wire").iterdir()) == \
        ["psrt_pb2.py", "psrt_pb2.pyi"]


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in OURS:
        for path in (root / pkg).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, bool]]:
    """(module imported, inside a function) for every import of a file, the names of a
    `from` import too (they may be modules), TYPE_CHECKING blocks included; a relative
    import is resolved against the file's package."""
    rel = path.relative_to(root).with_suffix("").parts
    package = rel[:-1]  # a module's package; an __init__'s own
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = ".".join([*package[:len(package) - child.level + 1]] if child.level
                                else [])
                module = ".".join(p for p in (base, child.module or "") if p)
                found.append((module, inner))
                found.extend((f"{module}.{a.name}", inner) for a in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def _graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = _modules(root)

    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for name, _ in _imports(path, root):
            target = ours(name) if name.split(".")[0] in OURS else None
            while target is not None:  # importing a.b.c runs a.b's and a's __init__ too
                if target != m and not m.startswith(target + "."):  # (its own: loading)
                    graph[m].add(target)
                target = target.rpartition(".")[0] or None
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles_between_our_modules() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_import_graph_sees_relative_typing_and_package_imports(tmp_path: Path) -> None:
    """Cycles the graph must not miss: through a relative import, a TYPE_CHECKING import,
    `import x as y`, and a package's __init__ (importing a.b.c runs a.b's __init__)."""
    files = {
        "pserver/__init__.py": "",
        "pserver/a/__init__.py": "from pserver.b.y import Y\n",
        "pserver/a/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                          "    from pserver.c import z\n",
        "pserver/b/__init__.py": "",
        "pserver/b/y.py": "from ..a.x import X\n",
        "pserver/c/__init__.py": "",
        "pserver/c/z.py": "import pserver.a.x as x\n",
        "pserver/d.py": "from . import c\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = _graph(tmp_path)
    assert graph["pserver.d"] >= {"pserver.c"}
    assert _cycles(graph) == [["pserver.a", "pserver.a.x", "pserver.b.y", "pserver.c.z"]]


def _top(path: Path) -> set[str]:
    return {name.split(".")[0] for name, _ in _imports(path)}


def test_package_boundaries() -> None:
    mods = _modules()
    for name, path in mods.items():
        top = _top(path)
        if name.startswith("ckpt"):
            assert not top & {"pserver", "trainer"}, f"{name}: ckpt imports nothing of ours"
        if name.startswith("pserver"):
            assert "trainer" not in top, f"{name}: pserver must not import trainer"
        if name.startswith("pserver.tables"):
            assert not top & {"grpc", "grpc_health", "grpc_reflection", "google",
                              "prometheus_client"}, f"{name}: tables import no gRPC"
            wire = {n for n, _ in _imports(path) if n.startswith(("pserver.rpc",
                                                                   "pserver.wire"))}
            assert not wire, f"{name}: tables import nothing of the wire ({wire})"
        if name.startswith("pserver.coord"):
            assert not top & {"grpc", "google"}, f"{name}: the coordinator's logic has no gRPC"
            rpc = {n for n, _ in _imports(path) if n.startswith("pserver.rpc")}
            assert not rpc, f"{name}: coord imports nothing of pserver.rpc ({rpc})"
        if name.startswith("trainer"):  # talks to pservers through the client interface
            tables = {n for n, _ in _imports(path) if n.startswith("pserver.tables")
                      and not n.startswith("pserver.tables.sharding")}
            assert not tables, f"{name}: trainers reach tables only through a client ({tables})"
        assert "proto" not in top, f"{name}: no package named proto is ours"


def test_imports_inside_functions_only_load_heavy_optional_packages() -> None:
    lazy = sorted(f"{name}: {imported}" for name, path in _modules().items()
                  for imported, inner in _imports(path)
                  if inner and imported.split(".")[0] not in LAZY_OK)
    assert lazy == []
