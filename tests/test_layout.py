"""The package layout's rules (docs/design.md): imports point one way between sub-packages, no
import cycles (function-local imports included), no private names taken from another module,
and every sub-package says in its __init__ what lives there."""

import ast
from pathlib import Path

from launch import REPO

PACKAGE = REPO / "tp_bench"
# Who may import whom: core <- models <- strategies <- engine <- frontends; analysis reads files
# and needs the core only; the front ends call the analysis.
ALLOWED = {
    "core": {"core"},
    "models": {"core", "models"},
    "strategies": {"core", "models", "strategies"},
    "engine": {"core", "models", "strategies", "engine"},
    "frontends": {"core", "models", "strategies", "engine", "frontends", "analysis"},
    "analysis": {"core", "analysis"},
    "": {"frontends"},            # tp_bench/__init__.py and __main__.py
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported tp_bench module, names taken from it) for every import, local ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("tp_bench")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tp_bench"):
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.append((target, []) if target in known else (node.module, [alias.name]))
    return found


def subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def test_imports_point_one_way_and_take_no_private_names():
    known = set(modules())
    problems = []
    for name, path in modules().items():
        mine = subpackage(name)
        for target, names in imports(path, known):
            theirs = subpackage(target)
            if theirs not in ALLOWED[mine]:
                problems.append(f"{name} imports {target}: {mine or 'tp_bench'} may not import "
                                f"{theirs or 'tp_bench'}")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                problems.append(f"{name} takes private {', '.join(private)} from {target}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    known = set(modules())
    graph = {name: {t for t, _ in imports(path, known) if t in known and t != name}
             for name, path in modules().items()}
    # A package's __init__ importing its own modules is not a cycle through them.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_subpackage_says_what_lives_there():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) <= 2, f"{init}: a docstring of one or two lines"


def test_the_rule_catches_a_wrong_import(tmp_path):
    """The checker itself can fail: a core module importing the engine is reported."""
    bad = tmp_path / "tp_bench" / "core" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from tp_bench.engine.session import Session\nfrom tp_bench.core.dims import _x\n")
    names = imports(bad, {"tp_bench.engine.session", "tp_bench.core.dims"})
    assert names == [("tp_bench.engine.session", ["Session"]), ("tp_bench.core.dims", ["_x"])]
    assert subpackage("tp_bench.core.bad") == "core" and "engine" not in ALLOWED["core"]
