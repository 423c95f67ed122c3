"""The package's import structure: every module imports on its own, no import cycles, layers point one way.

- Each module of `jaxcontrol` is imported in a fresh state: one subprocess imports them one after
  another, dropping every `jaxcontrol` entry from `sys.modules` before each, so a module that only
  imports when something else happened to be imported first fails here (third-party packages
  stay loaded, which keeps the whole run to seconds).
- The module-level import graph (built with `ast`: imports outside functions and outside
  `if TYPE_CHECKING:`, plus the parent packages an import runs) has no cycle.
- Layers: models (`jaxcontrol.models.*`) import nothing from the loaders, the pipeline, training
  or the command lines; the loaders (`jaxcontrol.convert.*`) nothing from the pipeline, training
  or the command lines. Checked for direct imports anywhere in a module (function bodies
  included) and for everything a module's module-level imports load.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxcontrol"

# layer -> the packages it must not import
FORBIDDEN = {
    "jaxcontrol.models": ("jaxcontrol.convert", "jaxcontrol.pipeline", "jaxcontrol.training", "jaxcontrol.commands"),
    "jaxcontrol.convert": ("jaxcontrol.pipeline", "jaxcontrol.training", "jaxcontrol.commands"),
}


def module_files() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package) for every `.py` file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


MODULES = module_files()


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, in_function: bool = False):
    """(import node, whether it runs when the module is imported), `if TYPE_CHECKING:` blocks left out."""
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, not in_function
        else:
            yield from _imports(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                       ast.Lambda)))


def _owner(name: str) -> str | None:
    """The module of ours that `name` (a module, or a module's attribute) lives in, or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            package = ".".join(base + ([node.module] if node.module else []))
        else:
            package = node.module or ""
        names = [f"{package}.{alias.name}" for alias in node.names]  # a submodule, or an attribute of `package`
    return [t for t in map(_owner, names) if t is not None and t != module]


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, every direct import) between our modules.

    Importing `a.b.c` first runs the packages `a` and `a.b`, so a module-level edge to a module
    also goes to its parent packages (except the importer's own, which are already loaded).
    """
    module_level: dict[str, set[str]] = {}
    direct: dict[str, set[str]] = {}
    for module, (path, is_package) in MODULES.items():
        module_level[module], direct[module] = set(), set()
        for node, at_import in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(module, is_package, node):
                direct[module].add(target)
                if not at_import:
                    continue
                module_level[module].add(target)
                parts = target.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if not (module == parent or module.startswith(parent + ".")):
                        module_level[module].add(parent)
    return module_level, direct


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
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

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module loading `start` loads (through module-level imports) -> the module that imports it."""
    seen = {start: ""}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen[nxt] = node
                todo.append(nxt)
    return seen


def _chain(seen: dict[str, str], end: str) -> str:
    chain = [end]
    while seen[chain[-1]]:
        chain.append(seen[chain[-1]])
    return " -> ".join(reversed(chain))


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# --- (a) every module imports on its own ---------------------------------------------------------------

_IMPORT_EACH = r"""
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "jaxcontrol" or m.startswith("jaxcontrol.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print("\n" + json.dumps(failures))
"""


def test_every_module_imports_on_its_own():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(sorted(MODULES))], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "modules that do not import on their own:\n" + "\n".join(
        f"{name}:\n{tb}" for name, tb in failures.items())


# --- (b) no import cycle ---------------------------------------------------------------------------------


def test_the_module_level_import_graph_has_no_cycle():
    module_level, _ = import_graph()
    cycle = find_cycle(module_level)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# --- (c) layers --------------------------------------------------------------------------------------------


def test_layers_import_downwards_only():
    module_level, direct = import_graph()
    wrong = []
    for module in MODULES:
        for layer, forbidden in FORBIDDEN.items():
            if not _in(module, (layer,)):
                continue
            wrong += [f"{module} imports {t}" for t in sorted(direct[module]) if _in(t, forbidden)]
            seen = reachable(module_level, module)
            # where the chain enters a forbidden layer (what lies beyond follows from it)
            wrong += [f"importing {module} loads {t}: {_chain(seen, t)}" for t in sorted(seen)
                      if _in(t, forbidden) and not _in(seen[t], forbidden)]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_graph_sees_relative_parent_and_function_imports():
    tree = ast.parse("from ..convert import sources\nif TYPE_CHECKING:\n    import jaxcontrol.pipeline\n"
                     "def f():\n    from .. import training\n")
    found = {(t, runs) for node, runs in _imports(tree) for t in _targets("jaxcontrol.models.clip", False, node)}
    assert found == {("jaxcontrol.convert.sources", True), ("jaxcontrol.training", False)}
