"""The orchestrator's rooms stay rooms (issue 31): no module grows past 400 lines, and the
imports between its modules form no cycle, so a reader following a sweep goes one way:
cli -> commands -> plan/spec -> execution -> tracking."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "orchestrator"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, *, lazy: bool) -> set[str]:
    """The orchestrator modules ``path`` imports: at module level (outside ``if TYPE_CHECKING``),
    or with ``lazy`` also those imported inside functions."""
    found: set[str] = set()

    def add(node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("orchestrator"))
        elif node.module and node.module.startswith("orchestrator"):
            for a in node.names:   # `from orchestrator import tracking` imports a module
                sub = ROOT / Path(*f"{node.module}.{a.name}".split("."))
                found.add(f"{node.module}.{a.name}" if sub.with_suffix(".py").exists() or sub.is_dir() else node.module)

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)) and (lazy or not in_function):
            add(node)
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def graph(lazy: bool) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p, lazy=lazy) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            walk(start, [start])
    return found


def test_no_orchestrator_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long
    assert not (PACKAGE / "experiment.py").exists()


def test_orchestrator_imports_form_no_cycle():
    assert cycles(graph(lazy=False)) == []
    assert cycles(graph(lazy=True)) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
