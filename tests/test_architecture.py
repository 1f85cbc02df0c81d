"""The package's shape: imports run one way through its layers, with no cycle anywhere, and no module
grows past a size one reads in a sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sdd_train"

# A module may import its own package and packages of a lower rank: exit_codes (the errors every layer
# raises) -> config -> kernels -> model, data, distributed -> checkpoint -> eval -> diagnostics -> train
# -> sweeps, plan -> the CLIs (``__main__``, which may import anything). Equal ranks do not import each other:
# parallelism is applied to a model as the model describes it (``Transformer.parallel_plan``), not by importing it.
RANKS = {"exit_codes": -1, "config": 0, "kernels": 1, "model": 2, "data": 2, "distributed": 2, "checkpoint": 4,
         "eval": 5, "diagnostics": 6, "train": 7, "sweeps": 8,
         "plan": 8}
CLI_RANK = 9
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The sdd_train modules ``path`` imports at run time, anywhere in it (lazy imports included;
    ``if TYPE_CHECKING:`` blocks are not run). ``from pkg import name`` is pkg.name when that is a module."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sdd_train"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdd_train"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def rank(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "__main__":
        return CLI_RANK
    return RANKS[parts[1]] if len(parts) > 1 else 0


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layering_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in edges.items():
        for target in targets:
            if package(source) != package(target) and rank(source) <= rank(target):
                bad.append(f"{source} imports {target}")
    return sorted(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_every_package_has_a_rank():
    assert {package(m) for m in modules() if package(m)} <= set(RANKS)


def test_imports_run_one_way():
    assert layering_violations(graph()) == []


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_the_checks_find_a_planted_cycle_and_an_upward_import():
    edges = graph()
    edges["sdd_train.model.layers"] = edges["sdd_train.model.layers"] | {"sdd_train.train.trainer"}
    assert "sdd_train.model.layers imports sdd_train.train.trainer" in layering_violations(edges)
    edges["sdd_train.config.schema"] = edges["sdd_train.config.schema"] | {"sdd_train.config.loading"}
    assert find_cycle(edges) is not None


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_readable(path: Path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path} is longer than {MAX_LINES} lines: split it"
