"""The package's shape (issue 11): imports go one way, modules and functions stay small, and the
unit tier starts no process. Expected values are the limits docs/architecture.md states."""
from __future__ import annotations

import ast
import functools
import os


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "mftune")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# name -> why it may be longer (none today; a new entry needs its reason in docs/architecture.md too)
LONG_ALLOWED: dict[str, str] = {}


def _modules() -> dict[str, str]:
    """``{dotted module name: path}`` of every module of the package (packages as their ``__init__``)."""
    out = {}
    for directory, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(directory, file)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, counting imports inside functions. ``from pkg import
    name`` is an import of ``pkg.name`` when that is a module, else of ``pkg``."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in modules:
                        edges.add(sub)
                    elif node.module in modules:
                        edges.add(node.module)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert len(graph) > 50 and graph["mftune.checkpoint.load"]  # the graph is real
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_function_level_import_of_the_package():
    """Inside functions, mftune modules are imported only by the package's lazy ``__getattr__`` (it keeps
    ``python -m mftune.launch`` free of torch); anywhere else it would hide a layering problem."""
    found = []
    for name, path in _modules().items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    module = (node.module if isinstance(node, ast.ImportFrom) else
                              node.names[0].name if isinstance(node, ast.Import) else "")
                    if (module or "").split(".")[0] == "mftune":
                        found.append(f"{name}.{fn.name}")
    assert found == ["mftune.__getattr__"]


def test_layers_import_one_way():
    """The lower layers never reach up: models, pet, config and data know nothing of the checkpoint
    tools or the trainer; the checkpoint package never imports the trainer."""
    graph = import_graph()
    lower = ("mftune.models", "mftune.pet", "mftune.config", "mftune.data", "mftune.errors", "mftune.fileio")
    upper = ("mftune.checkpoint", "mftune.trainer")
    for module, imports in graph.items():
        if module.startswith(lower):
            assert not [m for m in imports if m.startswith(upper)], module
        if module.startswith("mftune.checkpoint"):
            assert not [m for m in imports if m.startswith("mftune.trainer")], module


def test_formats_are_one_module_each_recognised_in_one_table():
    from mftune.checkpoint import formats

    for fmt in formats.FORMATS:
        assert {"matches", "entries", "header"} <= set(vars(fmt)), fmt.__name__
    recognising = [m for m, imports in import_graph().items()
                   if {f.__name__ for f in formats.FORMATS} <= imports]
    assert recognising == ["mftune.checkpoint.formats"]


def _too_long() -> list[str]:
    out = []
    for name, path in _modules().items():
        with open(path) as f:
            source = f.read()
        if source.count("\n") > MAX_MODULE_LINES and name not in LONG_ALLOWED:
            out.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_ALLOWED:
                    out.append(f"{name}.{node.name}: {length} lines")
    return out


def test_no_module_or_function_too_long():
    assert _too_long() == []


def test_unit_tier_imports_no_process_module():
    """tests/unit runs in one process (its conftest also refuses subprocess.Popen and os.system at run
    time): no unit test module imports subprocess or multiprocessing."""
    unit = os.path.dirname(os.path.abspath(__file__))
    offenders = []
    for file in sorted(f for f in os.listdir(unit) if f.startswith("test_") and f.endswith(".py")):
        with open(os.path.join(unit, file)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "subprocess" or "multiprocessing" in n for n in names):
                offenders.append(file)
    assert offenders == []


def test_test_files_have_unique_names_across_tiers():
    """pytest imports test files by basename (no packages): two tiers' files of one name break a run of
    several tiers (.ci/run) while each tier alone passes."""
    names = [f for tier in ("unit", "e2e", "distributed") for f in os.listdir(os.path.join(ROOT, "tests", tier))
             if f.startswith("test_") and f.endswith(".py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
