"""The package's dependency rules (docs/DESIGN decisions 7 and 12), checked statically.

Every .py under jaxaccel/ is parsed with `ast`; every `import` / `from ... import` counts,
at module level or inside a function, class or `if` (a deferred import is still a
dependency), with relative imports resolved. `from pkg import name` is an import of the
module `pkg.name` when that is a module of the package, else of `pkg` itself. Importing a
submodule also runs its parent packages' `__init__`, but that is not counted as an edge:
the rules are about what each file itself asks for.

One runtime check at the end imports `jaxaccel.decode.lm` in a fresh interpreter.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxaccel"
TENSORFLOW = ("tensorflow", "tensorflow_datasets", "tensorflow_text", "seqio")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. jaxaccel.data.corpus
    path: str  # its file, relative to the repository root
    line: int
    target: str  # the imported module, resolved (absolute)
    deferred: bool  # inside a function/class body rather than at module level

    def __str__(self) -> str:
        where = " (inside a function)" if self.deferred else ""
        return f"{self.path}:{self.line}: {self.source} imports {self.target}{where}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _files() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, path: str, modules: set[str]):
        self.module, self.is_package, self.path, self.modules = module, is_package, path, modules
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, node: ast.AST, target: str) -> None:
        self.found.append(Import(self.module, self.path, node.lineno, target, self.depth > 0))

    def _scoped(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scoped

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            package = self.module.split(".")
            if not self.is_package:
                package = package[:-1]
            if node.level - 1 > len(package) - 1:
                raise AssertionError(f"{self.path}:{node.lineno}: relative import beyond the top-level package")
            base_parts = package[:len(package) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base == "__future__":
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(node, sub if sub in self.modules else base)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("x.y") / __import__("x.y") with a literal name
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
            self._add(node, node.args[0].value)
        self.generic_visit(node)


def _collect() -> list[Import]:
    files = _files()
    modules = set(files)
    found: list[Import] = []
    for module, path in files.items():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        collector = _Collector(module, path.name == "__init__.py", rel, modules)
        collector.visit(tree)
        found.extend(collector.found)
    return found


IMPORTS = _collect()


def _is(target: str, prefixes) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _violations(sources, targets, allowed=()) -> list[Import]:
    return list(dict.fromkeys(  # one line per import statement and target
        i for i in IMPORTS if _is(i.source, sources) and _is(i.target, targets) and not _is(i.target, allowed)))


def _report(rule: str, bad: list[Import]) -> str:
    return rule + ":\n" + "\n".join(f"  {i}" for i in bad)


def test_the_walker_sees_module_level_function_level_and_relative_imports():
    seen = {(i.source, i.target, i.deferred) for i in IMPORTS}
    assert len(_files()) > 20 and len(IMPORTS) > 100
    assert ("jaxaccel.data.pipeline", "jaxaccel.data.cache", False) in seen  # `from jaxaccel.data import cache`
    assert ("jaxaccel.data.tf_import", "tensorflow", True) in seen  # deferred, inside import_tensorflow
    # relative imports resolve like absolute ones
    tree = ast.parse("from . import cache\nfrom .ids import PAD_ID\nfrom .. import errors\n")
    collector = _Collector("jaxaccel.data.vocab", False, "x.py", set(_files()))
    collector.visit(tree)
    assert [i.target for i in collector.found] == ["jaxaccel.data.cache", "jaxaccel.data.ids", "jaxaccel.errors"]


def test_decode_never_imports_train():
    bad = _violations("jaxaccel.decode", "jaxaccel.train")
    assert not bad, _report("decode must not import jaxaccel.train (DESIGN decision 12)", bad)


def test_kernels_are_leaves_and_never_import_model():
    bad = _violations("jaxaccel.pallas_kernels", "jaxaccel.model")
    assert not bad, _report("pallas_kernels must not import jaxaccel.model: kernels are leaves (decision 12)", bad)


def _cycle(graph: dict[str, dict[str, Import]]) -> list[Import] | None:
    """One cycle of the graph as its edges, or None."""
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    stack: list[Import] = []

    def visit(node: str) -> list[Import] | None:
        state[node] = 1
        for succ, edge in sorted(graph.get(node, {}).items()):
            if state.get(succ) == 1:
                start = next((k for k, e in enumerate(stack) if e.source == succ), len(stack))
                return stack[start:] + [edge]
            if succ not in state:
                stack.append(edge)
                found = visit(succ)
                if found:
                    return found
                stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_data_package_has_no_import_cycles():
    graph: dict[str, dict[str, Import]] = {}
    for i in IMPORTS:
        if _is(i.source, "jaxaccel.data") and _is(i.target, "jaxaccel.data") and i.source != i.target:
            graph.setdefault(i.source, {}).setdefault(i.target, i)
    cycle = _cycle(graph)
    assert cycle is None, _report(
        "import cycle in jaxaccel.data: " + " -> ".join([e.source for e in cycle] + [cycle[-1].target]), cycle)


def test_data_imports_nothing_above_it():
    bad = _violations("jaxaccel.data", "jaxaccel",
                      allowed=("jaxaccel.data", "jaxaccel.errors", "jaxaccel.config", "jaxaccel.files"))
    assert not bad, _report("jaxaccel.data may import only jaxaccel.data.*, jaxaccel.errors, jaxaccel.config and"
                            " jaxaccel.files (decision 12)", bad)


def test_the_leaf_modules_import_nothing_of_jaxaccel():
    bad = _violations(("jaxaccel.errors", "jaxaccel.files"), "jaxaccel")
    assert not bad, _report("jaxaccel.errors and jaxaccel.files are leaves everything may import", bad)


def test_model_decode_and_kernels_never_import_tensorflow():
    # also the data package's doors to TensorFlow: those modules exist to import it
    targets = TENSORFLOW + ("jaxaccel.data.tf_import", "jaxaccel.data.tasks")
    bad = _violations(("jaxaccel.model", "jaxaccel.decode", "jaxaccel.pallas_kernels"), targets)
    assert not bad, _report("TensorFlow/seqio are imported only by the data package, never by model, decode or"
                            " kernel code (decision 7)", bad)


def test_model_never_imports_decode_or_train():
    bad = _violations("jaxaccel.model", ("jaxaccel.decode", "jaxaccel.train"))
    assert not bad, _report("jaxaccel.model must not import jaxaccel.decode or jaxaccel.train (decision 12)", bad)


def test_importing_decode_loads_neither_train_nor_tensorflow():
    code = textwrap.dedent("""
        import sys
        import jaxaccel.decode.lm
        loaded = sorted(m for m in sys.modules if m == "jaxaccel.train" or m.startswith("jaxaccel.train.")
                        or m.split(".")[0] in ("tensorflow", "seqio", "tensorflow_datasets"))
        print("LOADED", " ".join(loaded))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.split("LOADED", 1)[1].split()
    assert not loaded, f"`import jaxaccel.decode.lm` loaded {', '.join(loaded)}"
