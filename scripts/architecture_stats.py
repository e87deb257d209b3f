"""Figures of clue_adv's layout: lines per file, import cycles, imports of clue_adv's own modules inside
functions, and the error-handling count of the sweep. `python scripts/architecture_stats.py [--json]`.

The import graph is read from the source with `ast` (nothing is imported): every `import clue_adv...` that runs,
at module level and inside functions (the usual way to hide a cycle); an import under `if TYPE_CHECKING:` serves
annotations only, never runs, and is counted apart. Importing `clue_adv.a.b` from outside package `clue_adv.a` runs
`clue_adv/a/__init__.py` first, so it is an edge to both. tests/test_architecture.py asserts on the same graph.
"""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clue_adv"
LONG_FILE = 500
# Where a function-level import of clue_adv's own modules is allowed: the CLI keeps `--help` fast that way.
LAZY_ALLOWED = {"clue_adv.cli"}


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)  # clue_adv modules it imports when it runs
    lazy: list[tuple[int, str]] = field(default_factory=list)  # (line, module) imported inside a function
    typing_only: set[str] = field(default_factory=set)  # imported under `if TYPE_CHECKING:`


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.Import | ast.ImportFrom, here: str, is_package: bool, known: set[str]) -> list[str]:
    """The clue_adv modules an import statement loads (a name imported from a package may be a submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            package = here.split(".") if is_package else here.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if n in known]


def _with_parents(target: str, importer: str) -> list[str]:
    """`target` and each package above it that is not also above `importer` (those already run first)."""
    parts = target.split(".")
    out = [target]
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent != "clue_adv" and not (importer == parent or importer.startswith(parent + ".")):
            out.append(parent)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def read_modules() -> dict[str, Module]:
    paths = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    known = {module_name(p) for p in paths}
    modules = {}
    for path in paths:
        name = module_name(path)
        text = path.read_text(encoding="utf-8")
        module = Module(name, path, len(text.splitlines()))
        tree = ast.parse(text)

        def visit(
            node: ast.AST, in_function: bool, typing_only: bool, module: Module = module, name: str = name
        ) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in _targets(child, name, path.name == "__init__.py", known):
                        if target == name:
                            continue
                        edges = {t for t in _with_parents(target, name) if t != name}
                        (module.typing_only if typing_only else module.imports).update(edges)
                        if in_function:
                            module.lazy.append((child.lineno, target))
                inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                visit(child, inner, typing_only or _is_type_checking(child))

        visit(tree, False, False)
        modules[name] = module
    return modules


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(modules[v].imports):
            if w not in modules:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            strongconnect(v)
    return sorted(found)


def handler_counts(paths: list[Path]) -> dict[str, int]:
    """`except` handlers, `contextlib.suppress(...)` uses and `isinstance(...)` calls in these files."""
    counts = {"except": 0, "suppress": 0, "isinstance": 0}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ExceptHandler):
                counts["except"] += 1
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == "suppress":
                    counts["suppress"] += 1
                elif name == "isinstance":
                    counts["isinstance"] += 1
    return counts


def stats() -> dict[str, object]:
    modules = read_modules()
    sweep_files = sorted((PACKAGE / "sweep").glob("*.py")) if (PACKAGE / "sweep").is_dir() else [PACKAGE / "sweep.py"]
    lazy = {m.name: m.lazy for m in modules.values() if m.lazy and m.name not in LAZY_ALLOWED}
    return {
        "files": len(modules),
        "lines": sum(m.lines for m in modules.values()),
        "largest": sorted(((m.lines, str(m.path.relative_to(ROOT))) for m in modules.values()), reverse=True)[:5],
        "over_500_lines": sorted(str(m.path.relative_to(ROOT)) for m in modules.values() if m.lines > LONG_FILE),
        "cycles": cycles(modules),
        "function_level_imports_outside_cli": sum(len(v) for v in lazy.values()),
        "function_level_imports_by_module": {k: len(v) for k, v in sorted(lazy.items())},
        "typing_only_imports": sum(len(m.typing_only) for m in modules.values()),
        "sweep_files": [str(p.relative_to(ROOT)) for p in sweep_files],
        "sweep_handlers": handler_counts(sweep_files),
    }


def main() -> None:
    figures = stats()
    if "--json" in sys.argv[1:]:
        print(json.dumps(figures, indent=2))
        return
    print(f"{figures['files']} modules, {figures['lines']} lines")
    print("largest: " + ", ".join(f"{path} {n}" for n, path in figures["largest"]))
    print(f"over {LONG_FILE} lines: {', '.join(figures['over_500_lines']) or 'none'}")
    print(f"import cycles: {len(figures['cycles'])}")
    for component in figures["cycles"]:
        print("  " + " <-> ".join(component))
    print(f"function-level imports of clue_adv modules outside cli.py: {figures['function_level_imports_outside_cli']}")
    for name, n in figures["function_level_imports_by_module"].items():
        print(f"  {name}: {n}")
    print(f"modules imported for annotations only (if TYPE_CHECKING): {figures['typing_only_imports']}")
    h = figures["sweep_handlers"]
    print(f"sweep ({len(figures['sweep_files'])} file(s)): {h['except']} except, {h['suppress']} suppress, ", end="")
    print(f"{h['isinstance']} isinstance")


if __name__ == "__main__":
    main()
