"""The package's import graph: no cycles, and each layer imports only the layers below it (docs/ARCHITECTURE.md).

Every import counts, deferred ones inside functions too: a cycle hidden behind a function-level import still
ties two files together. A package's ``__init__`` re-exporting its own children is not a dependency of theirs.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Lower number = lower layer. A module may import modules of its own layer or below, never above.
LAYERS = {
    "odysseus.config": 0,
    "odysseus.layout": 0,
    "odysseus.validation": 0,
    "odysseus.profiling": 0,
    # Leaves that lower layers may use: the RoPE tables (config validates scaled RoPE with them) and the ledger
    # every collective reports to (recomputation labels what it re-runs).
    "odysseus.ops.rope": 0,
    "odysseus.comm.ledger": 0,
    "odysseus.ops": 1,
    "odysseus.comm": 2,
    "odysseus.reference": 2,
    "odysseus.overlap": 3,
    "odysseus.strategies": 4,
    "odysseus.plan": 5,
    "odysseus.training": 5,
    "odysseus.integrations": 6,
    "odysseus.parity": 7,
    "odysseus.launch": 7,
    "odysseus.demo": 8,
    "odysseus": 8,
}


def _modules(package: str) -> dict[str, pathlib.Path]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != name and not m.startswith(name + ".")}


def _graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


@pytest.mark.parametrize("package", ["odysseus", "odykernels"])
def test_no_import_cycles(package):
    assert _cycles(_graph(package)) == []


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_each_module_imports_only_lower_layers():
    upward = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, deps in _graph("odysseus").items()
        for b in deps
        if _layer(b) > _layer(a)
    ]
    assert upward == []


def test_kernels_import_neither_odysseus_nor_torch_distributed():
    bad = []
    for path in (ROOT / "odykernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{path.name}: {n}" for n in names if n.startswith(("odysseus", "torch.distributed"))]
    assert bad == []
