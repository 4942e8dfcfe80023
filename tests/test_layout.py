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


def test_package_faces_only_hand_names_on():
    """An ``__init__.py`` is where a reader starts: under 40 lines, no function or class of its own
    (issue 49: tracking's face held 250 lines of logic)."""
    import ast

    for face in [*PACKAGE.rglob("__init__.py"), *(ROOT / "pouta_core").rglob("__init__.py")]:
        text = face.read_text()
        defined = [n.name for n in ast.parse(text).body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert len(text.splitlines()) < 40 and not defined, f"{face.relative_to(ROOT)}: {defined}"


def test_orchestrator_imports_form_no_cycle():
    assert cycles(graph(lazy=False)) == []
    assert cycles(graph(lazy=True)) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# --- Following a sweep's plan through the code ---------------------------------------------
#
# Issue 31's measure: read ``run_sweep`` and every orchestrator function it calls, depth first,
# each function once, in the order its body calls them (arguments before the call). The files
# of that reading, consecutive duplicates merged, are its *stays*; a stay in a file already
# left is a *return*: returns = stays - files. Calls resolve statically: names a module defines
# or imports, ``module.f``, ``self.f``, and ``x.f`` where ``x`` is a parameter annotated with an
# orchestrator class or a local bound to one (a constructor, or a call annotated to return it).
# Tune's calls into callbacks and schedulers are not reading order and are not followed.


class _Module:
    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        tree = ast.parse(path.read_text())
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.classes = {n.name: {m.name: m for m in n.body if isinstance(m, ast.FunctionDef)}
                        for n in tree.body if isinstance(n, ast.ClassDef)}
        self.aliases: dict[str, tuple[str, ...]] = {}   # name -> ("module", m) | ("object", m, name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("orchestrator"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    self.aliases[a.asname or a.name] = ("module", full) if _is_module(full) else \
                        ("object", node.module, a.name)
            elif isinstance(node, ast.Import):
                self.aliases.update({a.asname or a.name: ("module", a.name) for a in node.names
                                     if a.name.startswith("orchestrator")})


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


class CallReader:
    def __init__(self) -> None:
        self.modules = {module_name(p): _Module(module_name(p), p) for p in PACKAGE.rglob("*.py")}

    def lookup(self, module: str, name: str) -> tuple[str, str] | None:
        m = self.modules[module]
        if name in m.functions or name in m.classes:
            return module, name
        alias = m.aliases.get(name)
        if alias and alias[0] == "object" and alias[1] in self.modules:
            return self.lookup(alias[1], alias[2])
        return None

    def node(self, module: str, qualname: str) -> ast.FunctionDef | None:
        m = self.modules[module]
        cls, _, method = qualname.rpartition(".")
        if cls:
            return m.classes.get(cls, {}).get(method)
        return m.classes[qualname].get("__init__") if qualname in m.classes else m.functions.get(qualname)

    def _class_of(self, module: str, annotation: ast.expr | None) -> tuple[str, str] | None:
        if annotation is None:
            return None
        found = self.lookup(module, ast.unparse(annotation).split("|")[0].strip().strip("'\""))
        return found if found and found[1] in self.modules[found[0]].classes else None

    def calls(self, module: str, qualname: str) -> list[tuple[str, str]]:
        fn = self.node(module, qualname)
        if fn is None:
            return []
        m = self.modules[module]
        owner = qualname.rpartition(".")[0]
        typed = {a.arg: c for a in fn.args.args + fn.args.kwonlyargs if (c := self._class_of(module, a.annotation))}

        def resolve(f: ast.expr) -> tuple[str, str] | None:
            if isinstance(f, ast.Name):
                return self.lookup(module, f.id)
            if not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)):
                return None
            alias, name = m.aliases.get(f.value.id), f.value.id
            if alias and alias[0] == "module" and alias[1] in self.modules:
                return self.lookup(alias[1], f.attr)
            cls = (module, owner) if name == "self" and owner else typed.get(name)
            if cls and f.attr in self.modules[cls[0]].classes[cls[1]]:
                return cls[0], f"{cls[1]}.{f.attr}"
            return None

        def result_class(target: tuple[str, str] | None) -> tuple[str, str] | None:
            if target is None:
                return None
            if target[1] in self.modules[target[0]].classes:
                return target
            node = self.node(*target)
            return self._class_of(target[0], node.returns) if node is not None else None

        for st in ast.walk(fn):
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name) \
                    and isinstance(st.value, ast.Call) and (c := result_class(resolve(st.value.func))):
                typed[st.targets[0].id] = c
        found: list[tuple[str, str]] = []

        class Visitor(ast.NodeVisitor):
            def visit_Call(self, call: ast.Call) -> None:
                self.generic_visit(call)   # the arguments are evaluated first
                if target := resolve(call.func):
                    found.append(target)

        Visitor().visit(fn)
        return found

    def reading(self, module: str, qualname: str) -> list[tuple[str, str]]:
        seen: set[tuple[str, str]] = set()
        order: list[tuple[str, str]] = []

        def read(target: tuple[str, str]) -> None:
            if target in seen:
                return
            seen.add(target)
            order.append(target)
            for callee in self.calls(*target):
                read(callee)

        read((module, qualname))
        return order

    def stays(self, module: str, qualname: str) -> list[tuple[str, list[str]]]:
        out: list[tuple[str, list[str]]] = []
        for mod, name in self.reading(module, qualname):
            path = str(self.modules[mod].path.relative_to(ROOT))
            if not out or out[-1][0] != path:
                out.append((path, []))
            out[-1][1].append(name)
        return out


def returns(stays: list[tuple[str, list[str]]]) -> int:
    return len(stays) - len({path for path, _ in stays})


def test_following_a_sweeps_plan_returns_to_a_file_at_most_15_times():
    stays = CallReader().stays("orchestrator.commands.sweep", "run_sweep")
    path = "\n".join(f"{p}: {', '.join(names)}" for p, names in stays)
    assert len(stays) > 15, f"the reader lost its way:\n{path}"   # it does follow the sweep
    assert returns(stays) <= 15, path


def test_the_reader_counts_a_return_to_a_file_left_before():
    stays = [("a.py", ["f"]), ("b.py", ["g"]), ("a.py", ["h"]), ("c.py", ["i"])]
    assert returns(stays) == 1
    reader = CallReader()
    order = reader.reading("orchestrator.commands.sweep", "run_sweep")
    # Resolved through a local bound to a TrialSpec, a module alias and an annotated parameter:
    assert ("orchestrator.spec", "TrialSpec.config_for") in order
    assert ("orchestrator.execution.tuner", "run") in order
    assert ("orchestrator.plan", "Plan.check_new_or_resumed") in order


if __name__ == "__main__":   # python tests/test_layout.py: the reading, stay by stay
    stays = CallReader().stays("orchestrator.commands.sweep", "run_sweep")
    for p, names in stays:
        print(f"{p:42s} {', '.join(names)}")
    print(f"{sum(len(n) for _, n in stays)} functions, {len(stays)} stays in {len({p for p, _ in stays})} files, "
          f"{returns(stays)} returns")
