"""The import graph of fastprompt/ and kernels/ keeps its layers (docs/architecture.md):

* every module belongs to a layer, and imports only from its own layer or lower ones;
* no import cycles, between modules or through a package's __init__;
* no module imports another module's private names (`from x import _y`, `x._y`);
* kernels/ (fastprompt.kernels) imports nothing of fastprompt outside itself.

Every import counts, also one inside a function (a lazy import is still a dependency).
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module's layer is the entry with the longest matching prefix.
LAYERS = [
    ("kernels", ["fastprompt.kernels"]),
    ("foundation", ["fastprompt.errors", "fastprompt.atomic_io", "fastprompt.distributed", "fastprompt.render"]),
    ("config", ["fastprompt.config"]),
    ("data", ["fastprompt.data", "fastprompt.world"]),
    ("model", ["fastprompt.clip", "fastprompt.shipped_weights", "fastprompt.backends", "fastprompt.encoders",
               "fastprompt.methods", "fastprompt.compiled", "fastprompt.fast_paths"]),
    ("run folder", ["fastprompt.checkpoint", "fastprompt.run_lock", "fastprompt.run_folder"]),
    ("training", ["fastprompt.training"]),
    ("metrics", ["fastprompt.metrics", "fastprompt.world.baselines"]),
    ("protocols", ["fastprompt.protocols", "fastprompt.report"]),
    ("applications", ["fastprompt.official", "fastprompt.sweep", "fastprompt.bench", "fastprompt.demo",
                      "fastprompt.world.pretrain"]),
    ("interface", ["fastprompt.api", "fastprompt.cli", "fastprompt.__main__", "fastprompt", "fastprompt.world.cli"]),
]


def _module_name(path: Path) -> str:
    if path.is_relative_to(REPO / "kernels"):
        parts = ["fastprompt", "kernels", *path.relative_to(REPO / "kernels").with_suffix("").parts]
    else:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for folder in ("fastprompt", "kernels") for p in (REPO / folder).rglob("*.py")}


def _layer(module: str) -> int:
    best = max(((len(prefix), rank) for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS (and docs/architecture.md)"
    return best[1]


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, private name or "", line) for every import of fastprompt code in `module`."""
    tree = ast.parse(MODULES[module].read_text())
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fastprompt":
                    found.append((alias.name, "", node.lineno))
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "fastprompt":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from fastprompt import distributed`: the submodule itself
                    found.append((sub, "", node.lineno))
                    aliases[alias.asname or alias.name] = sub
                else:
                    private = alias.name if alias.name.startswith("_") and not alias.name.startswith("__") else ""
                    found.append((target, private, node.lineno))
    for node in ast.walk(tree):  # `distributed._control`: a private name through a module alias
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append((aliases[node.value.id], node.attr, node.lineno))
    return [(t if t in MODULES else t.rsplit(".", 1)[0], p, line) for t, p, line in found]


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_go_only_downward():
    upward = [f"{MODULES[m].relative_to(REPO)}:{line}: {LAYERS[_layer(m)][0]} imports {t} ({LAYERS[_layer(t)][0]})"
              for m, edges in GRAPH.items() for t, _, line in edges if t != m and _layer(t) > _layer(m)]
    assert upward == []


def test_kernels_import_nothing_of_fastprompt():
    outside = [f"{MODULES[m].relative_to(REPO)}:{line}: {t}" for m, edges in GRAPH.items()
               if m.startswith("fastprompt.kernels") for t, _, line in edges if not t.startswith("fastprompt.kernels")]
    assert outside == []


def test_no_private_names_across_modules():
    private = [f"{MODULES[m].relative_to(REPO)}:{line}: {t}.{name}" for m, edges in GRAPH.items()
               for t, name, line in edges if name and t != m]
    assert private == []


def test_no_import_cycles():
    # A submodule's import runs its package's __init__ first; that implicit edge is not a cycle.
    edges = {m: {t for t, _, _ in GRAPH[m] if t != m and not m.startswith(t + ".")} for m in MODULES}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    assert cycles == []


@pytest.mark.parametrize("source, expected", [
    ("from .batches import EpochBatches", ("fastprompt.training.batches", "")),
    ("from ..run_folder import _flat", ("fastprompt.run_folder", "_flat")),
    ("from fastprompt import distributed", ("fastprompt.distributed", "")),
    ("import fastprompt.distributed as d\nd._control", ("fastprompt.distributed", "_control")),
])
def test_the_walker_sees_relative_private_and_attribute_imports(source, expected, monkeypatch, tmp_path):
    # The checks above can only fail if the walker finds these; prove that it does.
    path = tmp_path / "probe.py"
    path.write_text(source + "\n")
    monkeypatch.setitem(MODULES, "fastprompt.training.probe", path)
    assert expected in [(t, p) for t, p, _ in _imports("fastprompt.training.probe")]
