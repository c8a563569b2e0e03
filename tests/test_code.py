"""Properties of the code itself: lint-clean, and no import cycle among the package's modules."""
import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "trec_accel"


def test_ruff_passes():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "trec_accel", "scripts", "tests"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _imports(path) -> set[str]:
    """The trec_accel modules a module imports, at any depth (imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base == "trec_accel" or base.startswith("trec_accel."):
                base = base.removeprefix("trec_accel").lstrip(".")
                # `from . import x` and `from trec_accel import x` name modules; `from .x import y` names x
                found.update([base.split(".")[0]] if base else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("trec_accel."))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_functions_are_short():
    """No function of the package has more than 60 lines of code (its docstring not counted): each does one
    thing."""
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = node.body[0]
                if ast.get_docstring(node) is not None:
                    n -= doc.end_lineno - doc.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
