"""The package layout (issue 13, "a layout that shows it"): no import cycles, no module importing
another's private names, at most 10 modules directly in fastpeft/, no symlinks, every module
importable on its own.

The import graph is read statically (ast) from fastpeft/ and kernels/ (shipped as fastpeft.kernels),
with every import statement counted, function-level ones included: a cycle "broken" by importing
inside a function is still a cycle.  An import of a name from a package counts as an import of
that package's __init__ unless the name is a submodule.  Private names (a leading underscore) may
be imported only within the package that defines them.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"fastpeft": ROOT / "fastpeft", "fastpeft.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every Python module of the package."""
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"} | set(SOURCES)


def _package_of(module: str) -> str:
    return module if module in PACKAGES else module.rpartition(".")[0]


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's package
                base = _package_of(module).split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            out += [(source, a.name, node.lineno) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    edges = {}
    for module in MODULES:
        targets = set()
        for source, name, _ in _imports(module):
            if not (source == "fastpeft" or source.startswith("fastpeft.")):
                continue
            sub = f"{source}.{name}" if name else ""
            targets.add(sub if sub in MODULES else source)
        edges[module] = {t for t in targets if t in MODULES and t != module}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_cycles_and_function_level_imports():
    """The checks below can fail: a two-module cycle and a cycle through a function are found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    imports = {(s, n) for s, n, _ in _imports("fastpeft.methods.sparse_select")}
    assert ("fastpeft.nn.inject", "target_names") in imports  # an edge the graph must hold
    assert "fastpeft.nn.inject" in _graph()["fastpeft.methods.sparse_select"]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (function-level imports included): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _private_import(module: str, source: str, name: str):
    """What ``from source import name`` (or ``import source``) in ``module`` takes that is private to
    another package, or None.  A private module (``kernels/_math.py``) belongs to its package, a
    private name to its module (or, for a package's __init__, to the package)."""
    target = f"{source}.{name}" if name and f"{source}.{name}" in MODULES else source
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _private(part):
            owner = ".".join(parts[:i])
            return None if module.startswith(owner + ".") else target
    if target == source and name and _private(name):
        inside = source in PACKAGES and module.startswith(source + ".")
        return None if inside else f"{source}.{name}"
    return None


def test_the_private_rule_can_fail():
    assert _private_import("fastpeft.tools.aot", "fastpeft.kernels", "_config") == "fastpeft.kernels._config"
    assert _private_import("fastpeft.kernels.sparse", "fastpeft.kernels", "_config") is None
    assert _private_import("fastpeft.interop.peft", "fastpeft.nn.inject", "_helper") == "fastpeft.nn.inject._helper"
    assert _private_import("fastpeft.interop.peft", "fastpeft.nn.inject", "set_submodule") is None


def test_no_module_imports_another_packages_private_names():
    bad = [f"{module}:{line} imports {taken}" for module in MODULES for source, name, line in _imports(module)
           if (source == "fastpeft" or source.startswith("fastpeft."))
           and (taken := _private_import(module, source, name)) is not None]
    assert not bad, "private names imported across modules: " + "; ".join(bad)


def test_at_most_ten_modules_directly_in_the_package_and_no_symlinks():
    top = sorted(p.name for p in (ROOT / "fastpeft").glob("*.py"))
    assert len(top) <= 10, top
    links = [str(p.relative_to(ROOT)) for folder in (ROOT / "fastpeft", ROOT / "kernels", ROOT / "csrc")
             for p in [folder, *folder.rglob("*")] if p.is_symlink()]
    assert not links, links


def _import_alone(module: str) -> tuple[str, int, str]:
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    return module, proc.returncode, proc.stderr[-2000:]


def test_every_module_imports_on_its_own():
    """``import fastpeft`` loads most modules in its own order; every module it does not load is then
    imported in a fresh interpreter of its own (an import that only works after another is a bug)."""
    probe = ("import sys, fastpeft; print('\\n'.join(m for m in sys.modules if m == 'fastpeft' "
             "or m.startswith('fastpeft.')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(proc.stdout.split())
    rest = [m for m in MODULES if m not in loaded and not m.endswith("__main__")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [(m, err) for m, rc, err in pool.map(_import_alone, rest) if rc != 0]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed)
