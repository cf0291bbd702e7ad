"""The shape of the code, read from its import graph: layers, no cycles, no private reach-ins."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "nvmefs"

# Lowest first: a module may import from its own layer and the layers below, never above.
LAYERS: list[tuple[str, ...]] = [
    ("nvmefs", "nvmefs.errors", "nvmefs.mainloop"),  # the package itself holds only __version__
    ("nvmefs.nvme",),
    ("nvmefs.store", "nvmefs.linux"),
    ("nvmefs.engine",),
    ("nvmefs.sim",),
    ("nvmefs.workloads", "nvmefs.options"),
    ("nvmefs.sources", "nvmefs.recorder"),
    ("nvmefs.outputs", "nvmefs.fs", "nvmefs.mountpoint"),  # peers: see PEERS
    ("nvmefs.daemon", "nvmefs.report", "nvmefs.locate", "nvmefs.console"),
    ("nvmefs.cli",),
    ("nvmefs.__main__",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def rank(module: str) -> int:
    """The layer of `module`: the longest layer prefix that names it or a package above it."""
    best, best_len = -1, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best


def imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every nvmefs import in a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nvmefs":
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "nvmefs":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:  # `from nvmefs.store import events`: a module
                    yield sub, None, node.lineno
                else:
                    yield base, alias.name, node.lineno


def private_attribute_uses(path: Path, module_aliases: set[str]) -> Iterator[tuple[str, int]]:
    """`mod._name` where `mod` is an nvmefs module imported into this file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield f"{node.value.id}.{node.attr}", node.lineno


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {imp for imp, _, _ in imports(m, p, known)} - {m} for m, p in mods.items()}


def test_every_package_has_an_init_so_a_wheel_carries_it() -> None:
    for d in [PKG, *(p for p in PKG.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        if any(d.glob("*.py")):
            assert (d / "__init__.py").exists(), f"{d} has modules but no __init__.py"


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    mods = modules()
    known = set(mods)
    upward = []
    for m, p in mods.items():
        for imp, _, line in imports(m, p, known):
            if rank(imp) > rank(m):
                upward.append(f"{p.relative_to(PKG.parent)}:{line}: {m} imports {imp}")
    assert upward == []


def test_no_private_names_cross_modules() -> None:
    mods = modules()
    known = set(mods)
    found = []
    for m, p in mods.items():
        aliases = set()
        for imp, name, line in imports(m, p, known):
            where = f"{p.relative_to(PKG.parent)}:{line}"
            if any(part.startswith("_") and part != "__main__" for part in imp.split(".")):
                found.append(f"{where}: private module {imp}")
            if name is not None and name.startswith("_") and not name.startswith("__"):
                found.append(f"{where}: {imp}.{name}")
            if name is None:
                aliases.add(imp.rpartition(".")[2])
        for use, line in private_attribute_uses(p, aliases):
            found.append(f"{p.relative_to(PKG.parent)}:{line}: {use}")
    assert found == []


def test_the_import_graph_has_no_cycle() -> None:
    g = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            # Importing `nvmefs.a.b` runs `nvmefs.a` first, but that is not an edge of ours.
            if n not in g:
                continue
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert cycles == []


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("from nvmefs.cli import main\n", "upward"),
        ("from nvmefs.engine.base import _helper\n", "private"),
    ],
)
def test_the_checks_catch_what_they_are_for(source: str, why: str, tmp_path: Path) -> None:
    # The rules above must be able to fail: a layer-1 module doing each forbidden thing.
    path = tmp_path / "bad.py"
    path.write_text(source)
    found = list(imports("nvmefs.nvme.bad", path, set(modules())))
    if why == "upward":
        assert any(rank(imp) > rank("nvmefs.nvme.bad") for imp, _, _ in found)
    else:
        assert any(name and name.startswith("_") for _, name, _ in found)


# -- one completion sink, one way to read the ring ------------------------------------------------

# The one module that changes an engine's counters (Stats): the completion sink.
SINK = "nvmefs.engine.sink"
MUTATORS = {"update", "clear", "pop", "setdefault", "subtract", "popitem"}


def _is_stats(node: ast.expr, aliases: set[str]) -> bool:
    """Whether an expression is an engine's Stats: `<anything>.stats` or a name bound to one."""
    if isinstance(node, ast.Attribute) and node.attr == "stats":
        return True
    return isinstance(node, ast.Name) and node.id in aliases


def _within_stats(node: ast.expr, aliases: set[str]) -> bool:
    """Whether a target is a counter of a Stats (`s.errors`, `s.failed[k]`)."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return isinstance(node, ast.Attribute) and _is_stats(node.value, aliases)


def stats_mutations(path: Path) -> Iterator[int]:
    """Lines that change a Stats counter (assignments, augmented ones, mutating calls)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and _is_stats(node.value, set())
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in MUTATORS
        ):
            targets = [node.func.value]
        if any(_within_stats(t, aliases) for t in targets):
            yield node.lineno


def test_only_the_completion_sink_changes_the_counters() -> None:
    found = [
        f"{p.relative_to(PKG.parent)}:{line}"
        for m, p in modules().items()
        if m != SINK
        for line in stats_mutations(p)
    ]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "def f(e):\n    e.stats.errors += 1\n",
        "def f(self):\n    st = self.stats\n    st.failed[(1, 2, 3)] += 1\n",
        "def f(e):\n    e.stats.by_status.update([1])\n",
    ],
)
def test_the_counter_rule_catches_what_it_is_for(source: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.py"
    path.write_text(source)
    assert list(stats_mutations(path))


# Peers over the recorder: the outputs and the filesystem never import each other.
PEERS = ("nvmefs.outputs", "nvmefs.fs")


def test_the_outputs_and_the_filesystem_are_peers() -> None:
    g = graph()

    def side(m: str) -> str | None:
        return next((p for p in PEERS if m == p or m.startswith(p + ".")), None)

    crossing = [
        f"{m} imports {n}"
        for m, deps in g.items()
        for n in deps
        if side(m) is not None and side(n) is not None and side(m) != side(n)
    ]
    assert crossing == []


# The one way to read the ring: its cursor (store/ring.py). read_after is the ring's own.
READERS = {"nvmefs.store.ring"}


def ring_reads(path: Path) -> Iterator[int]:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "read_after":
            yield node.lineno


def test_every_consumer_reads_the_ring_through_its_cursor() -> None:
    found = [
        f"{p.relative_to(PKG.parent)}:{line}"
        for m, p in modules().items()
        if m not in READERS
        for line in ring_reads(p)
    ]
    assert found == []
