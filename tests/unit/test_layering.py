"""The layering rule: layers import downward only, and no module imports itself in a loop.

Layers, bottom to top (a module may import its own group and any LOWER layer):

    net, images    plumbing: netlink, guest images (they import no other DCP package)
    tracer         the ptrace engine, the syscall table and the Coordinator seam: every
                   `tracer.*` module except the command's
    oss            the services; the embedded OSS serves the tracer's Coordinator seam
    vmagent        the agent and deputy, and the home side that places programs on instances
    command        the dcptrace command: `tracer.cli`, `tracer.config`, `tracer.compose`
                   (it lives in tracer/ because it runs beside the traced program)

Besides: the one composition module (`tracer.compose`) is the only module outside
their packages that imports the embedded OSS (`oss.embedded`, `oss.local`) or `vmagent`,
but for the instance tracer (`vmagent.trace.host`), which serves `oss.embedded` to the
programs an agent runs; inside `oss`, the shared database layer knows no service and a
service's SQL names only its own tables.

Imports are read with `ast` from every module.  For the layers every import counts,
inside a function or under TYPE_CHECKING too (a lazy import is still a dependency); for
cycles every import counts but those under TYPE_CHECKING (they never run).  Run by hand
for a report: `python tests/unit/test_layering.py` prints every violation.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

PACKAGES = ("net", "images", "tracer", "oss", "vmagent")
# The dcptrace command: on top of everything, though its files sit in tracer/.
COMMAND = ("tracer.cli", "tracer.config", "tracer.compose", "tracer.__main__")
LAYERS: tuple[tuple[str, ...], ...] = (
    ("net", "images"),
    ("tracer",),
    ("oss",),
    ("vmagent",),
    ("command",),
)
LAYER_OF = {group: i for i, layer in enumerate(LAYERS) for group in layer}

# The one module that wires the embedded OSS and the cluster into a run, and what it
# wires: no module outside the package named first imports these but COMPOSITION.
COMPOSITION = "tracer.compose"
# The instance tracer wires the embedded OSS into each traced session the same way
# (vmagent.trace.host: a view's path maps served beside the program, on the instance).
INSTANCE_COMPOSITION = "vmagent.trace.host"
COMPOSED = (("oss", "oss.embedded"), ("oss", "oss.local"), ("vmagent", "vmagent"))

# Inside oss (from the store split on): what a module under the first prefix may import
# of oss.  The db layer knows no service; no service module reaches the HTTP server.
OSS_RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("oss.db", ("oss.db", "oss.errors"), "the db layer knows no service"),
)
OSS_NEVER: tuple[tuple[str, str, str], ...] = (
    ("oss.", "oss.server", "routes are mounted by the server, never the other way"),
    ("oss.", "oss.cli", "the command line is the top of oss"),
    ("oss.", "oss.lab", "the lab command is the top of oss"),
)
# The tables each service owns: SQL naming a table appears only in its owner's modules.
TABLE_OWNER = {
    "accounts": "oss.accounts", "users": "oss.accounts", "tokens": "oss.accounts",
    "instance_types": "oss.compute", "pools": "oss.compute", "instances": "oss.compute",
    "instance_tokens": "oss.compute", "programs": "oss.compute", "placements": "oss.compute",
    "policies": "oss.compute", "limits": "oss.billing", "billing": "oss.billing",
    "log_chunks": "oss.telemetry", "leases": "oss.ipc", "processes": "oss.telemetry",
    "report_seq": "oss.telemetry", "measured_net": "oss.telemetry",
    "measured_storage": "oss.telemetry",
}  # fmt: skip
# (module, table): the only places SQL may name another service's table, and why.
SQL_EXCEPTIONS = {
    ("oss.accounts.schema", "billing"): "migration 2 back-filled spend totals from billing",
}
SQL_TABLE = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE|ON)\s+([a-z_]+)\b")


def group_of(module: str) -> str:
    """The layer group of a module: its top package, or `command`."""
    if _under_any(module, COMMAND):
        return "command"
    return module.split(".")[0]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the layered packages: dotted name -> file."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks (not their else)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    out.update(id(n) for n in ast.walk(stmt))
    return out


def imports(
    name: str, path: Path, known: set[str], typing_too: bool = True
) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each import of a layered package in the file."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if typing_too else _type_checking_only(tree)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[: len(here) - node.level + 1]
                base = ".".join(here + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            if subs:
                yield from ((s, node.lineno) for s in subs)
            if len(subs) < len(node.names):
                yield base, node.lineno


def graph(root: Path = ROOT, typing_too: bool = True) -> dict[str, list[tuple[str, int]]]:
    """Module -> the modules it imports (resolved to modules that exist)."""
    mods = modules(root)
    known = set(mods)
    out: dict[str, list[tuple[str, int]]] = {}
    for name, path in mods.items():
        edges = []
        for target, line in imports(name, path, known, typing_too):
            while target not in known and "." in target:  # `import a.b.Name` forms
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                edges.append((target, line))
        out[name] = edges
    return out


def cycles(g: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in g.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def _under(name: str, prefix: str) -> bool:
    return (
        name == prefix
        or name.startswith(prefix + ".")
        or (prefix.endswith(".") and name.startswith(prefix))
    )


def _under_any(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(_under(name, p) for p in prefixes)


def layer_violations(root: Path = ROOT) -> list[str]:
    """Imports that go up a layer or sideways into another group of the same layer."""
    out = []
    for name, edges in graph(root).items():
        src = group_of(name)
        for target, line in edges:
            dst = group_of(target)
            if dst != src and LAYER_OF[dst] >= LAYER_OF[src]:
                out.append(f"{name}:{line} imports {target} ({src} may not import {dst})")
    return out


def composition_violations(root: Path = ROOT) -> list[str]:
    """The embedded OSS and the cluster are wired into a run in one module only."""
    out = []
    for name, edges in graph(root).items():
        if name == COMPOSITION:
            continue
        for target, line in edges:
            if name == INSTANCE_COMPOSITION and _under(target, "oss.embedded"):
                continue
            for owner, composed in COMPOSED:
                if _under(target, composed) and not _under(name, owner):
                    out.append(f"{name}:{line} imports {target} (only {COMPOSITION} wires it)")
    return out


def oss_violations(root: Path = ROOT) -> list[str]:
    """The db layer knows no service; nothing in oss imports its server or commands;
    SQL naming a table sits in the table's owner."""
    out = []
    g = graph(root)
    for name, edges in g.items():
        for prefix, allowed, why in OSS_RULES:
            if _under(name, prefix):
                for target, line in edges:
                    if _under(target, "oss") and not any(_under(target, a) for a in allowed):
                        out.append(f"{name}:{line} imports {target} ({why})")
        for prefix, never, why in OSS_NEVER:
            # The tops of oss: its commands, and oss.local (a dcptrace run's own
            # OSS serves its agents' routes: issue 10).
            if (
                _under(name, prefix)
                and not _under(name, never)
                and name not in ("oss.cli", "oss.lab", "oss.__main__", "oss.local")
            ):
                for target, line in edges:
                    if _under(target, never):
                        out.append(f"{name}:{line} imports {target} ({why})")
    for name, path in modules(root).items():
        if not _under(name, "oss"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for table in SQL_TABLE.findall(node.value):
                    owner = TABLE_OWNER.get(table)
                    if owner and not _under(name, owner) and (name, table) not in SQL_EXCEPTIONS:
                        out.append(f"{name}:{node.lineno} names table {table} (owned by {owner})")
    return sorted(set(out))


def test_no_import_cycles() -> None:
    found = cycles(graph(typing_too=False))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_layers_import_downward_only() -> None:
    bad = layer_violations()
    assert not bad, "\n".join(bad)


def test_one_composition_module() -> None:
    bad = composition_violations()
    assert not bad, "\n".join(bad)


def test_oss_services_keep_to_themselves() -> None:
    bad = oss_violations()
    assert not bad, "\n".join(bad)


def test_the_rules_catch_what_they_forbid(tmp_path: Path) -> None:
    """The checker itself: planted cycles, upward imports and wiring outside compose."""
    files = {
        "tracer/__init__.py": "",
        "tracer/a.py": "from tracer import b\n",
        "tracer/b.py": "def f() -> None:\n    import tracer.a\n",  # lazy: still a cycle
        "tracer/c.py": "from tracer.cli import main\n",  # the engine under the command
        "tracer/cli.py": "from tracer import compose\nfrom vmagent.cluster import local\n",
        "tracer/config.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from tracer.cli import main\n"  # no cycle: never runs
        ),
        "tracer/compose.py": "from oss import embedded\n",
        "net/__init__.py": "",
        "net/c.py": "from tracer.a import x\n",
        "oss/__init__.py": "",
        "oss/embedded.py": "from tracer.config import x\n",
        "vmagent/__init__.py": "",
        "vmagent/cluster/__init__.py": "",
        "vmagent/cluster/local.py": "from oss.embedded import x\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cycles(graph(tmp_path, typing_too=False)) == [["tracer.a", "tracer.b"]]
    assert sorted(layer_violations(tmp_path)) == [
        "net.c:1 imports tracer.a (net may not import tracer)",
        "oss.embedded:1 imports tracer.config (oss may not import command)",
        "tracer.c:1 imports tracer.cli (tracer may not import command)",
    ]
    assert composition_violations(tmp_path) == [
        "tracer.cli:2 imports vmagent.cluster.local (only tracer.compose wires it)",
        "vmagent.cluster.local:1 imports oss.embedded (only tracer.compose wires it)",
    ]


def test_the_repository_is_read() -> None:
    """The checks see the real tree: the composition module and its lazy imports."""
    mods = modules()
    assert COMPOSITION in mods and "oss.embedded" in mods and "vmagent.cluster" in mods
    wired = {target for target, _ in graph()[COMPOSITION]}
    assert {"oss.embedded", "oss.local", "vmagent.cluster.coordinator"} <= wired


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    for c in cycles(graph(root, typing_too=False)):
        print("cycle:", " <-> ".join(c))
    for line in layer_violations(root) + composition_violations(root) + oss_violations(root):
        print(line)
