"""The arrows between the daemon's modules, read from their imports (also those inside
functions; not those only for type checking): no cycle, and the workflows know neither the
HTTP library nor systemd."""

from __future__ import annotations

import ast
from pathlib import Path

LOADER = Path(__file__).resolve().parent.parent / "loader"
# The workflows: what the daemon does, whoever asks and however it is shown.
WORKFLOWS = (
    "unlock",
    "progress",
    "resources",
    "uploads",
    "archive",
    "cache",
    "crypto",
    "integrity",
)


def _imports(module: Path) -> set[str]:
    """The modules `module` imports when it runs."""
    tree = ast.parse(module.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        # `if TYPE_CHECKING:` blocks import for mypy only.
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for inner in node.body for child in ast.walk(inner))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from loader import cli` imports loader.cli.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"loader.{path.stem}": path for path in LOADER.glob("*.py")}
    return {
        name: {imported for imported in _imports(path) if imported in modules} - {name}
        for name, path in modules.items()
    }


def test_no_import_cycle_inside_the_daemon() -> None:
    graph = _graph()
    assert len(graph) > 15, graph  # the walk found the package
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert cycles == []


def test_the_workflows_import_neither_aiohttp_nor_systemd() -> None:
    for name in WORKFLOWS:
        imported = _imports(LOADER / f"{name}.py")
        wrong = sorted(m for m in imported if m.split(".")[0] == "aiohttp" or m == "loader.systemd")
        assert wrong == [], f"loader/{name}.py imports {wrong}"


def test_the_reader_sees_imports_inside_functions_but_not_type_checking_ones(
    tmp_path: Path,
) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import aiohttp\n"
        "def f():\n    from loader import systemd\n"
    )
    assert _imports(module) == {"typing", "typing.TYPE_CHECKING", "loader", "loader.systemd"}
