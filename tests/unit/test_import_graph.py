"""The package's import graph, read from the source: no cycles, the package's own modules
imported at module level (lazy imports only for the heavy libraries), and nothing heavy
pulled in at import time (the Ray job driver and Tune trial drivers import these modules,
and `import unsloth` raises without a GPU)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sentiment_ray"
HEAVY = ["torch", "transformers", "unsloth", "ray", "peft", "trl", "datasets", "mlflow", "matplotlib"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, module: str) -> list[str]:
    """The package's own modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "sentiment_ray"]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sentiment_ray":
        out = []
        for alias in node.names:
            candidate = f"{node.module}.{alias.name}"
            out.append(candidate if candidate in MODULES else node.module)
        return out
    return []


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(own modules imported at module level, (line, module) of those imported elsewhere)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top: set[str] = set()
    for node in tree.body:
        if _is_type_checking(node):
            continue
        top.update(_targets(node, module))
    nested = []
    for node in ast.walk(tree):
        if node in tree.body:
            continue
        for target in _targets(node, module):
            nested.append((node.lineno, target))
    return top, nested


def test_every_import_of_an_own_module_is_at_module_level():
    misplaced = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {target}" for m in MODULES for line, target in imports(m)[1]
    ]
    assert misplaced == [], "import the package's own modules at module level:\n" + "\n".join(misplaced)


def test_the_import_graph_has_no_cycle():
    graph = {m: sorted(imports(m)[0] - {m}) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, []):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_heavy_library_at_import_time():
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(MODULES)!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "", f"importing the package pulled in {out.stdout.strip()}"
