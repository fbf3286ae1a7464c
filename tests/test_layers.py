"""The package's layers (docs/architecture.md), read from the sources with ``ast``: no import
cycle among softmax_ce's modules (imports inside functions included), no module importing a
private name of another module, and no source file over 600 lines."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "softmax_ce"
MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _is_module(name: str) -> bool:
    return name in MODULES or name == "softmax_ce._C"


def _package_of(name: str, path: pathlib.Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: pathlib.Path):
    """(imported module, imported name or None, line) of every import of a softmax_ce module in
    the file, wherever it stands (module level or inside a function)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _package_of(name, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "softmax_ce":
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "softmax_ce":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _is_module(sub):
                    yield sub, None, node.lineno  # `from . import ops`: the module itself
                else:
                    yield target, alias.name, node.lineno


def _module_aliases(name, path):
    """Local names bound to softmax_ce modules by the file's imports."""
    aliases = {}
    tree = ast.parse(path.read_text(), str(path))
    package = _package_of(name, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _is_module(sub):
                    aliases[alias.asname or alias.name] = sub
    return aliases, tree


def _graph():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = _graph()
    assert graph["softmax_ce.functional"], "the import graph was not read"
    # the dependency runs one way: the public functions may reach the distributed path lazily
    assert "softmax_ce.distributed" in graph["softmax_ce.functional"]
    assert not any(m.startswith("softmax_ce.functional") or m.startswith("softmax_ce.linear")
                   or m == "softmax_ce.tokens"
                   for d in ("group", "dtensor", "linear_head", "protocol", "tokens")
                   for m in graph[f"softmax_ce.distributed.{d}"])
    assert _cycles(graph) == []


def test_no_private_name_crosses_modules():
    """``from .x import _name`` and ``x._name`` reach into another module's privates: what two
    modules share lives in a bottom module (``_args``, ``_core``, ``_linear_core``) under a
    public name."""
    found = []
    for name, path in MODULES.items():
        for target, imported, line in _imports(name, path):
            if imported is not None and imported.startswith("_") and target != name:
                found.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {imported}")
        aliases, tree = _module_aliases(name, path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases[node.value.id] != name):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                             f"{node.value.id}.{node.attr}")
    assert found == []


def test_the_checks_see_a_cycle():
    """The checker itself: a made-up cycle is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


@pytest.mark.parametrize("folder", ["softmax_ce", "csrc"])
def test_no_source_file_over_600_lines(folder):
    suffixes = {".py", ".cpp", ".h", ".cu", ".cuh"}
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*"))
            if p.suffix in suffixes and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
