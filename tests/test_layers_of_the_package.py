"""The file tree is the reading order: minispec's layers import one way, at the top of the file, without cycles.

    foundation (errors, backend) -> mistral/ -> speculative/ -> decoders/ -> training/ -> bench -> cli

A module may import from its own layer and the layers before it, never from a later one; imports of minispec
modules sit at the top of the file (a reader sees the real dependency graph there); only the optional
dependencies may be imported inside a function. The package's __init__ (the public surface) and __main__ sit
above everything. The graph is read from the source with `ast`, not by importing it.
"""
import ast
import re
import shutil
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minispec"
LAYERS = ["errors", "backend", "mistral", "speculative", "decoders", "training", "bench", "cli"]
RANK = {"errors": 0, "backend": 0, "mistral": 1, "speculative": 2, "decoders": 3, "training": 4, "bench": 5, "cli": 6}
OPTIONAL = {"cupy", "torch", "transformers", "bayes_opt", "threadpoolctl"}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module):
    """The layer a dotted minispec module belongs to (None for the package's __init__ / __main__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else None


def resolve(module, path, node):
    """The absolute minispec modules an ImportFrom node names (a name imported from a package may be a module)."""
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if not base.startswith("minispec"):
        return []
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
            (PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").exists()
        targets.append(sub if is_module else base)
    return targets


def graph():
    """{module: [(imported minispec module, line, inside a function)]} and [(module, line, optional import name)]."""
    edges, lazy = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        out = edges.setdefault(module, [])
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(n) for f in funcs for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for t in resolve(module, path, node):
                    out.append((t, node.lineno, id(node) in inner))
                if node.level == 0 and id(node) in inner and not (node.module or "").startswith("minispec"):
                    lazy.append((module, node.lineno, node.module.split(".")[0]))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("minispec"):
                        out.append((alias.name, node.lineno, id(node) in inner))
                    elif id(node) in inner:
                        lazy.append((module, node.lineno, alias.name.split(".")[0]))
    return edges, lazy


def test_every_module_belongs_to_a_layer():
    edges, _ = graph()
    strays = [m for m in edges if layer_of(m) is not None and layer_of(m) not in RANK]
    assert not strays, f"modules outside the layers {LAYERS}: {strays}"


def test_no_module_imports_from_a_later_layer():
    edges, _ = graph()
    upward = [f"{m}:{line} imports {t}" for m, ts in edges.items() for t, line, _ in ts
              if layer_of(m) is not None and layer_of(t) is not None and RANK[layer_of(t)] > RANK[layer_of(m)]]
    assert not upward, "imports against the reading order:\n" + "\n".join(upward)


def test_minispec_imports_sit_at_the_top_of_the_file():
    edges, _ = graph()
    hidden = [f"{m}:{line} imports {t} inside a function" for m, ts in edges.items() for t, line, inner in ts if inner]
    assert not hidden, "\n".join(hidden)


def test_only_optional_dependencies_are_imported_inside_functions():
    _, lazy = graph()
    bad = [f"{m}:{line} imports {name}" for m, line, name in lazy if name not in OPTIONAL]
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    edges, _ = graph()
    deps = {m: {t for t, _, _ in ts if t in edges and t != m and not m.startswith(t + ".")} for m, ts in edges.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(deps[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"
    for m in sorted(deps):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("bad, expect", [
    ("from ..cli import main\n", "against the reading order"),
    ("def f():\n    from .tree import Tree\n", "inside a function"),
    ("def f():\n    import json\n", "imports json"),
    ("from .loop import run_loop\n", "import cycle: minispec.speculative.(loop|verify) -> "),
])
def test_the_checks_see_a_planted_violation(tmp_path, monkeypatch, bad, expect):
    """Each check fails when a violation is planted in a copy of the package (so none passes vacuously)."""
    copy = tmp_path / "minispec"
    shutil.copytree(PACKAGE, copy)
    target = copy / "speculative" / "verify.py"
    target.write_text(target.read_text() + "\n" + bad)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    checks = (test_no_module_imports_from_a_later_layer, test_minispec_imports_sit_at_the_top_of_the_file,
              test_only_optional_dependencies_are_imported_inside_functions, test_the_import_graph_has_no_cycle)
    messages = []
    for check in checks:
        try:
            check()
        except AssertionError as e:
            messages.append(str(e))
    assert any(re.search(expect, m) for m in messages), messages
