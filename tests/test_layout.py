"""The package's layout: every module imports, the packages import each other without a cycle, no
module reaches for another package's private names, and each package says in one line what it holds."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import muxserve

ROOT = Path(muxserve.__file__).parent
# Modules of the GPU path over a package that GPU machines have and the CPU requirements do not list
# (cuda-bindings): imported where the package is installed.
GPU_ONLY = {"muxserve.flexstore.cuda_vmm": "cuda"}


def _modules() -> list[tuple[str, Path]]:
    """(dotted name, file) of every module of the package."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


def _unit(module: str) -> str:
    """The part of the layout a module belongs to: its top-level package or module under muxserve."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "muxserve"


def _imports(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every muxserve import, lazy ones included."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            if base == "muxserve" or base.startswith("muxserve."):
                out += [(base, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("muxserve.")]
    return out


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(muxserve.__path__, "muxserve.")]
    assert len(names) == len(_modules()) - 1  # every file but the package's own __init__
    for name in names:
        if name.endswith("__main__"):  # those run their command when imported
            continue
        if name in GPU_ONLY and importlib.util.find_spec(GPU_ONLY[name]) is None:
            continue
        importlib.import_module(name)


def test_the_packages_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for name, path in _modules():
        for module, imported, _ in _imports(name, path):
            target = _unit(f"{module}.{imported}" if module == "muxserve" else module)
            if target != _unit(name):
                graph.setdefault(_unit(name), set()).add(target)
    # the scheduler knows no process, no server, no instance; of FlexStore only the residency types
    assert graph["scheduler"] == {"engine", "flexstore", "ipc"}
    flexstore = {module for name, path in _modules() if _unit(name) == "scheduler"
                 for module, _, _ in _imports(name, path) if _unit(module) == "flexstore"}
    assert flexstore == {"muxserve.flexstore.residency"}
    assert "instance" not in graph["flexstore"] and "scheduler" not in graph["flexstore"]
    done: set[str] = set()

    def visit(unit: str, path: list[str]) -> None:
        if unit in path:
            pytest.fail(f"import cycle: {' -> '.join(path[path.index(unit):] + [unit])}")
        if unit not in done:
            for target in sorted(graph.get(unit, ())):
                visit(target, path + [unit])
            done.add(unit)

    for unit in sorted(graph):
        visit(unit, [])


def test_no_module_imports_private_names_of_another_package():
    offenders = [f"{name}:{line} imports {imported} from {module}"
                 for name, path in _modules() for module, imported, line in _imports(name, path)
                 if imported and imported.startswith("_") and _unit(module) != _unit(name)]
    assert offenders == []


def test_every_package_says_in_one_line_what_it_holds():
    inits = sorted(ROOT.glob("*/__init__.py"))
    assert len(inits) == 11
    for init in inits:
        lines = (ast.get_docstring(ast.parse(init.read_text())) or "").splitlines()
        assert lines and lines[0].strip() and (len(lines) == 1 or not lines[1].strip()), init
