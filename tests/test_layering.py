"""The package's layering, read from the source: no import circle, kernels below the public modules.

Every ``import`` counts, those inside functions too (a lazy import still makes a circle: the
module graph is what a reader has to hold in their head).
"""

from __future__ import annotations

import ast
from pathlib import Path

import dotattn

ROOT = Path(dotattn.__file__).parent
# What kernels may import from the package: the calls' definitions and the error types.
KERNEL_MAY_IMPORT = {"dotattn.semantics", "dotattn.decode_semantics", "dotattn.errors", "dotattn._version"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The dotattn modules ``path`` imports (``from . import x`` counts as ``x`` when it is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dotattn"))
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if not target.startswith("dotattn"):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found.update(subs or [target])
    found.discard(name)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    """Module → the dotattn modules it imports."""
    paths = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            # `from . import x` in a submodule names its package first: that edge is no circle
            if m.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    graph = _graph()
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_the_checker_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_kernels_import_no_public_module():
    graph = _graph()
    for module, deps in graph.items():
        if module.startswith("dotattn.kernels."):
            public = {d for d in deps if not d.startswith("dotattn.kernels") and d not in KERNEL_MAY_IMPORT}
            assert not public, f"{module} imports {sorted(public)}"


def test_public_modules_use_no_private_kernel_function():
    """maps.py and friends call a backend's public functions, never its ``_private`` ones."""
    for path in ROOT.rglob("*.py"):
        if _module_name(path).startswith("dotattn.kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in ("numpy_tiled", "cpu", "reference") and node.attr.startswith("_"):
                    raise AssertionError(f"{path.name} uses {node.value.id}.{node.attr}")
