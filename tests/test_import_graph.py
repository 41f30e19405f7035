"""The package's layout is its architecture: imports run one way only (docs/architecture.md).

Read with ``ast`` (nothing is imported), over every module of ``mass``, ``mass_kernels`` and the ``bench/``
scripts, including imports inside functions:
- no circle between modules;
- no upward import between wings, as ranked in ``WINGS`` below (a module may import its own wing and lower ones);
- no private name (``_x``) imported from another module, and no private module (``_x.py``) imported from
  outside its own package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the longest prefix listed; ``mass`` alone is the public API's __init__.
WINGS = [
    "mass_kernels",          # the ops: Triton kernels and their PyTorch references
    "mass.files",            # what users bring (checkpoints, open_clip names, hub ids), atomic writes
    "mass.method",           # pure functions: decomposition, SVD solvers, merges, routers, support fit
    "mass.storage",          # the saved artifact (plain data) and its file
    "mass.nn",               # task layers, passes, banks, caches, MASSModel, CLIP loading, merge
    "mass.evaluation",       # data, zero-shot heads, presets, the evaluation protocol
    "mass",                  # the public API (mass/__init__.py re-exports)
    "mass.tools.common",     # timing, memory, provenance helpers of the tools
    "mass.tools.demo",       # the offline demo
    "mass.tools.bench",      # benchmarks (may use the demo's models)
    "mass.serve",            # the Ray Serve server (issue 22); only the CLI's `serve` imports it, lazily
    "mass.tools",            # the CLI (dispatches to the demo and benchmarks)
    "bench",                 # benchmark scripts outside the package
]


def _module_files():
    for package in ("mass", "mass_kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            yield ".".join(parts), path, is_package
    for path in sorted((ROOT / "bench").glob("*.py")):
        yield f"bench.{path.stem}", path, False


MODULES = {name: (path, is_package) for name, path, is_package in _module_files()}


def wing_of(module: str) -> str:
    if module == "mass":
        return "mass"
    candidates = [w for w in WINGS if w != "mass" and (module == w or module.startswith(w + "."))]
    if not candidates:
        raise AssertionError(f"module {module} is in no wing of WINGS: add it to the table")
    return max(candidates, key=len)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> bool:
    return name.split(".")[0] in ("mass", "mass_kernels") or name.startswith("bench.")


def imports_of(module: str):
    """(imported module, imported name or None, line) for every project import in ``module``."""
    path, is_package = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            if not _ours(source):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:  # ``from mass.nn import model``: the module itself
                    yield sub, None, node.lineno
                else:
                    yield source, alias.name, node.lineno


def _edges():
    edges = {}
    for module in MODULES:
        edges[module] = {}
        for target, _, line in imports_of(module):
            if target in MODULES and target != module:
                edges[module].setdefault(target, line)
    return edges


EDGES = _edges()


def test_every_module_is_in_a_wing_and_every_subpackage_says_what_it_holds():
    for module, (path, is_package) in MODULES.items():
        wing_of(module)
        if is_package and module.startswith("mass"):
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            assert doc and len(doc.split()) >= 10, f"{path}: a package's __init__ says what lives there"


def test_no_import_circles():
    """Tarjan's strongly connected components over module → module edges: every component is one module."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in EDGES[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in EDGES:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_imports_only_run_downwards():
    rank = {w: i for i, w in enumerate(WINGS)}
    upward = []
    for module, targets in EDGES.items():
        for target, line in targets.items():
            if rank[wing_of(target)] > rank[wing_of(module)]:
                upward.append(f"{module}:{line} imports {target} ({wing_of(module)} < {wing_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_private_name_is_imported_from_another_module():
    found = []
    for module in MODULES:
        for target, name, line in imports_of(module):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                found.append(f"{module}:{line} imports {name} from {target}")
            leaf = target.rsplit(".", 1)[-1]
            package = target.rsplit(".", 1)[0]
            if leaf.startswith("_") and not leaf.startswith("__") and not module.startswith(package + "."):
                found.append(f"{module}:{line} imports the private module {target} from outside {package}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source,expected", [
    ("from mass.nn.model import MASSModel\n", [("mass.nn.model", "MASSModel")]),
    ("from ..method import router\n", [("mass.method.router", None)]),
    ("def f():\n    from .passes import _x\n", [("mass.nn.passes", "_x")]),
    ("import mass_kernels.cpu as c\n", [("mass_kernels.cpu", None)]),
    ("import numpy\nfrom typing import Any\n", []),
])
def test_the_reader_resolves_absolute_relative_and_lazy_imports(monkeypatch, tmp_path, source, expected):
    """The checks above are only as good as the import reader: it must see every kind of import."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    monkeypatch.setitem(MODULES, "mass.nn.probe", (path, False))
    assert [(t, n) for t, n, _ in imports_of("mass.nn.probe")] == expected
