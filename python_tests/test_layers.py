"""The package's import layers (issue 25): every ``remit_ext`` module imports only its own layer
and the layers below it, and no module of ``remit_ext`` or ``bench`` is part of an import circle.

The graph is read from the source with ``ast``: module-level imports and imports inside
functions (a lazy import that dodges a circle at run time is still a circle here), relative and
absolute, plus ``importlib.import_module("<literal>")``. Imports whose target is computed at run
time (``hf/__init__``'s lazy attribute loader) are not seen. The table below is also in the
``remit_ext`` package docstring; a new module must be given a layer here.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# (layer, module patterns), lowest first. A module may import its own layer and the ones above
# it in this list, never one below.
LAYERS = [
    ("L0 leaves", ["remit_ext.reference", "remit_ext._checks", "remit_ext._build",
                   "remit_ext._source_tree", "remit_ext._methods", "remit_ext._files",
                   "remit_ext._C", "remit_ext.testing"]),
    ("L1 registered-op Python side", ["remit_ext._grads", "remit_ext._fakes_autograd",
                                      "remit_ext.triton", "remit_ext.triton.*"]),
    ("L2 dispatcher", ["remit_ext._backends"]),
    ("L3 fused-linear engine", ["remit_ext._linear_plan", "remit_ext._linear_engine",
                                "remit_ext._linear_ops", "remit_ext._linear_local"]),
    ("L4 distributed", ["remit_ext.distributed", "remit_ext.distributed.*"]),
    ("L5 public API", ["remit_ext", "remit_ext.functional", "remit_ext.linear",
                       "remit_ext.modules", "remit_ext.parallel", "remit_ext.fsdp"]),
    ("L6 users", ["remit_ext.rmt", "remit_ext.demo", "remit_ext.bench", "remit_ext.bench.*",
                  "remit_ext.__main__", "remit_ext.hf", "remit_ext.hf.*", "remit_ext.train",
                  "remit_ext.train.*"]),
]
# Compiled modules: no Python source, no imports of their own.
EXTENSIONS = ("remit_ext._C",)


def find_modules(root: Path, packages) -> dict[str, Path | None]:
    """Dotted module name -> source file, for every .py under the given top-level packages."""
    mods: dict[str, Path | None] = {name: None for name in EXTENSIONS
                                    if name.split(".")[0] in packages}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods) -> set[str]:
    """The modules of ``mods`` that ``name`` (source ``path``) imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[:len(package) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [(base, a.name) for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [(node.args[0].value, None)]
        else:
            continue
        for base, attr in targets:
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else pkg.
            if attr is not None and f"{base}.{attr}" in mods:
                out.add(f"{base}.{attr}")
            elif base in mods:
                out.add(base)
    out.discard(name)
    return out


def import_graph(root: Path, packages) -> dict[str, set[str]]:
    mods = find_modules(root, packages)
    return {name: (_imports(name, path, mods) if path is not None else set())
            for name, path in mods.items()}


def layer_of(module: str, layers=LAYERS) -> int | None:
    hits = [i for i, (_, patterns) in enumerate(layers)
            if any(fnmatch.fnmatchcase(module, p) for p in patterns)]
    return hits[0] if len(hits) == 1 else None


def upward_imports(graph, layers=LAYERS) -> list[str]:
    """Every edge from a module to one in a higher layer, as 'a (L) -> b (L)'."""
    bad = []
    for a in sorted(graph):
        la = layer_of(a, layers)
        for b in sorted(graph[a]):
            lb = layer_of(b, layers)
            if la is not None and lb is not None and lb > la:
                bad.append(f"{a} ({layers[la][0]}) -> {b} ({layers[lb][0]})")
    return bad


def cycles(graph) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# ------------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO, ("remit_ext", "bench"))


def test_every_module_has_one_layer(graph):
    orphans = [m for m in sorted(graph) if m.startswith("remit_ext") and layer_of(m) is None]
    assert not orphans, f"give these modules a layer in LAYERS (exactly one): {orphans}"


def test_no_upward_import(graph):
    bad = upward_imports({m: e for m, e in graph.items() if m.startswith("remit_ext")})
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)


def test_no_import_circle(graph):
    assert cycles(graph) == []


def test_the_graph_sees_the_package(graph):
    # The scan found the modules and their edges (a broken scan would pass the tests above).
    assert len([m for m in graph if m.startswith("remit_ext.")]) > 30
    assert "remit_ext._linear_engine" in graph["remit_ext.distributed.vocab_parallel_linear"]
    assert "remit_ext.distributed.fsdp" in graph["remit_ext.linear"]
    assert "remit_ext.bench._harness" in graph["remit_ext.bench.report"]
    assert "remit_ext.bench.runner" in graph["bench.test_suite"]


# ------------------------------------------------------------------------- test the tester


def _package(tmp_path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(tmp_path, ("remit_ext",))


def test_rejects_an_upward_import_inside_a_function(tmp_path):
    g = _package(tmp_path, {
        "remit_ext/__init__.py": "from . import functional\n",
        "remit_ext/_checks.py": "def f():\n    from .functional import token_stats\n",
        "remit_ext/functional.py": "from . import _checks as chk\n",
    })
    assert g["remit_ext._checks"] == {"remit_ext.functional"}
    assert upward_imports(g) == ["remit_ext._checks (L0 leaves) -> remit_ext.functional "
                                 "(L5 public API)"]
    assert cycles(g) == [["remit_ext._checks", "remit_ext.functional"]]


def test_rejects_a_circle_within_a_layer_and_an_import_by_name(tmp_path):
    g = _package(tmp_path, {
        "remit_ext/__init__.py": "",
        "remit_ext/linear.py": "from remit_ext import functional\n",
        "remit_ext/functional.py": ("import importlib\n\n\ndef g():\n"
                                    "    return importlib.import_module('remit_ext.linear')\n"),
        "remit_ext/distributed/__init__.py": "",
        "remit_ext/distributed/fsdp.py": "from ..linear import remit_linear_loss\n",
    })
    assert cycles(g) == [["remit_ext.functional", "remit_ext.linear"]]
    assert upward_imports(g) == ["remit_ext.distributed.fsdp (L4 distributed) -> "
                                 "remit_ext.linear (L5 public API)"]


def test_accepts_downward_imports(tmp_path):
    g = _package(tmp_path, {
        "remit_ext/__init__.py": "from .linear import remit_linear_loss\n",
        "remit_ext/linear.py": "from .distributed import fsdp\nfrom . import _checks\n",
        "remit_ext/_checks.py": "import torch\n",
        "remit_ext/distributed/__init__.py": "",
        "remit_ext/distributed/fsdp.py": "from .. import _linear_local\n",
        "remit_ext/_linear_local.py": "from ._backends import select_backend\n",
        "remit_ext/_backends.py": "",
    })
    assert upward_imports(g) == [] and cycles(g) == []
    assert g["remit_ext.linear"] == {"remit_ext.distributed.fsdp", "remit_ext._checks"}
