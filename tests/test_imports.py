"""The package's import structure: a cheap ``import distlayer``, Ray only in the driver,
no import cycles between modules, and no private name used outside its own module.

The structural checks read the source with :mod:`ast`; they import nothing from distlayer.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

PACKAGE = "distlayer"
PKG_DIR = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
RAY_IMPORTERS = {"distlayer.pipeline", "distlayer.data",  # the driver, the Ray Data processor
                 "distlayer.metrics"}  # ray.util.metrics, imported inside export_to_ray only


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (``distlayer``, ``distlayer.store``, ...)."""
    mods = {}
    for f in sorted(PKG_DIR.rglob("*.py")):
        parts = (PACKAGE, *f.relative_to(PKG_DIR).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


MODULES = module_files()


def rel(path: pathlib.Path) -> str:
    return str(path.relative_to(PKG_DIR.parent))


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (they never run, so they make no cycle)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def known_module(dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the package, or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def imports(mod: str) -> list[tuple[ast.stmt, ast.alias, str, str | None]]:
    """Every import of ``mod`` that reaches the package, at any nesting level.

    Returns:
        ``(statement, alias, target module, imported name or None)``, one per imported
        name. ``from .m import x`` gives ``target="distlayer.m", name="x"``; ``from . import
        m`` and ``import distlayer.m`` give ``target="distlayer.m", name=None``. Imports
        under ``if TYPE_CHECKING:`` are left out.
    """
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = type_checking_nodes(tree)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = known_module(alias.name)
                if target:
                    out.append((node, alias, target, None))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            target = known_module(source)
            if target is None:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:
                    out.append((node, alias, sub, None))
                else:
                    out.append((node, alias, target, alias.name))
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# --------------------------------------------------------------------------- tests


def test_import_distlayer_loads_neither_torch_nor_ray():
    code = textwrap.dedent("""
        import sys
        import distlayer, distlayer.planner, distlayer.cost, distlayer.config, distlayer.errors
        print(",".join(m for m in ("torch", "ray") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PKG_DIR.parent)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.strip()
    assert not loaded, (
        f"`import distlayer, distlayer.planner, distlayer.cost, distlayer.config, distlayer.errors` loads {loaded}: "
        "import it inside the function that needs it, or load the public name lazily in __init__.py"
    )


def test_public_names_still_import():
    code = "from distlayer import AutoModel, DistModel, LayerStore, split, run_job, StoreError; import distlayer; " \
           "assert 'AutoModel' in dir(distlayer) and distlayer.split is split"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PKG_DIR.parent)
    assert proc.returncode == 0, proc.stderr


def test_only_the_driver_imports_ray():
    bad = []
    for mod, path in MODULES.items():
        if mod in RAY_IMPORTERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{rel(path)}:{node.lineno} imports {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not bad, f"only {sorted(RAY_IMPORTERS)} may import ray; move it there:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same node, or None."""
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

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    graph: dict[str, set[str]] = {mod: set() for mod in MODULES}
    where: dict[tuple[str, str], str] = {}
    for mod in MODULES:
        for node, _alias, target, _name in imports(mod):
            if target != mod:
                graph[mod].add(target)
                where.setdefault((mod, target), f"{rel(MODULES[mod])}:{node.lineno}")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(
        f"  {where[a, b]} imports {b}" for a, b in zip(cycle, cycle[1:]))


def private_uses(mod: str) -> list[str]:
    """``from .m import _x`` and ``m._x`` (``m`` a distlayer module) in ``mod``."""
    path = MODULES[mod]
    found, bound = [], {}
    for node, alias, target, name in imports(mod):
        if target == mod:
            continue
        if name is not None and is_private(name):
            found.append(f"{rel(path)}:{node.lineno} imports {name} from {target}")
        elif name is None and (isinstance(node, ast.ImportFrom) or alias.asname):
            bound[alias.asname or alias.name] = target  # `from . import m [as a]`, `import distlayer.m as a`
        elif name is None:
            bound[PACKAGE] = PACKAGE  # `import distlayer.m` binds the package name
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in bound:
            continue
        dotted = ".".join([bound[value.id], *reversed(chain)])
        if dotted in MODULES and dotted != mod:  # `m._x`, not `m.obj._x`
            found.append(f"{rel(path)}:{node.lineno} uses {dotted}.{node.attr}")
    return found


def test_no_private_name_used_outside_its_module():
    bad = [v for mod in MODULES for v in private_uses(mod)]
    assert not bad, ("a name with a leading underscore is private to its module; make it public "
                     "(no underscore, with a docstring) or move the code that needs it:\n" + "\n".join(bad))


def test_ray_importers_exist():
    gone = sorted(RAY_IMPORTERS - set(MODULES))
    assert not gone, f"RAY_IMPORTERS names modules that do not exist: {gone}; remove them from tests/test_imports.py"


# The layer store package, bottom to top: what each of its modules may import from the others.
STORE_LAYERS = {"distlayer.store.format": set(),                            # what both agree on
                "distlayer.store.writer": {"distlayer.store.format"},       # distlayer split
                "distlayer.store.reader": {"distlayer.store.format", "distlayer.store.writer"}}  # open_store splits


def test_store_package_layers():
    store = {m for m in MODULES if m.startswith("distlayer.store.")}
    assert store == set(STORE_LAYERS), (f"distlayer/store/ holds {sorted(store)}; add a new module to STORE_LAYERS in "
                                        "tests/test_imports.py with the store modules it may import")
    bad = [f"{rel(MODULES[mod])}:{node.lineno} imports {target}"
           for mod, allowed in STORE_LAYERS.items() for node, _a, target, _n in imports(mod)
           if target.startswith("distlayer.store") and target != mod and target not in allowed]
    assert not bad, ("the store's modules import downwards only (reader -> writer -> format); move the shared "
                     "code down to format.py:\n" + "\n".join(bad))
