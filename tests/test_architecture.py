"""The import rule of docs/architecture.md: a package imports only packages on a lower floor.

Every import counts, including those inside functions (they hide loops, they do not remove them).
Siblings on one floor (prune and certify) may not import each other: what one needs from the other
is passed in by the caller.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prunecert"

# floor of every top-level module or sub-package of prunecert (docs/architecture.md, "Layers")
FLOORS: dict[str, int] = {
    "errors": 0,
    "fileutil": 1, "network": 1, "data": 1, "solvers": 1, "threads": 1, "objectives": 1,
    "progress": 1, "stage_budgets": 1,
    "io": 2, "scale": 2,
    "core": 3, "train": 3,
    "prune": 4, "certify": 4,
    "adversarial": 5, "budget": 5,
    "reports": 6,
    "audit": 7, "merge": 7,
    "cli": 8,
    "__main__": 9, "__init__": 9,
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> list[tuple[str, str, str, int]]:
    """(importing unit, imported unit, file, line) for every import of a prunecert module."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        src = "__init__" if module == "prunecert" else _unit(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; use the absolute prunecert.* name")
            else:
                continue
            for name in names:
                if name.startswith("prunecert.") and _unit(name) != src:
                    out.append((src, _unit(name), str(path.relative_to(SRC.parent)), node.lineno))
    return out


def test_every_package_has_a_floor():
    units = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    missing = sorted(units - set(FLOORS))
    assert not missing, f"place these in FLOORS and in docs/architecture.md: {missing}"


def test_imports_only_go_down():
    bad = [f"{where}:{line}: {src} (floor {FLOORS[src]}) imports {dst} (floor {FLOORS[dst]})"
           for src, dst, where, line in _imports()
           if src in FLOORS and dst in FLOORS and FLOORS[dst] >= FLOORS[src]]
    assert not bad, "imports that are not downward:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["prunecert.core", "prunecert.certify", "prunecert.prune"])
def test_lower_floors_import_without_upper_ones(module):
    """Importing a floor must not load anything above it (a runtime check of the same rule)."""
    import subprocess
    import sys

    code = (f"import sys, {module}; above = [m for m in sys.modules if m.split('.')[:2] in "
            "(['prunecert','adversarial'], ['prunecert','audit'], ['prunecert','cli'], ['prunecert','reports'])]; "
            "print(above); sys.exit(1 if above else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# packages whose modules import the project only at the top (an import inside a function hides a
# dependency, and a loop behind it); the others still have some, each listed in docs/architecture.md
TOP_IMPORTS_ONLY = ["adversarial", "audit", "budget", "merge", "prune", "reports", "scale", "train"]
# (file, module) -> why it is imported inside a function there
DEFERRED = {
    ("prunecert/scale/executor.py", "prunecert.scale.cluster"): "dask.distributed costs ~1 s; only --scheduler needs it",
    ("prunecert/reports/__init__.py", "prunecert.reports.html"): "matplotlib + jinja2 cost ~1.7 s; only HTML needs them",
    ("prunecert/reports/write.py", "prunecert.reports.html"): "matplotlib + jinja2 cost ~1.7 s; only HTML needs them",
}


def _function_imports(path: Path) -> list[str]:
    """'file:line module' for every prunecert import inside a function of `path`."""
    out = []
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                where = str(path.relative_to(SRC.parent))
                out += [f"{where}:{node.lineno} {n}" for n in names
                        if n.startswith("prunecert") and (where, n) not in DEFERRED]
    return out


@pytest.mark.parametrize("unit", TOP_IMPORTS_ONLY)
def test_no_project_imports_inside_functions(unit):
    root = SRC / unit
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    inside = [hit for f in files for hit in _function_imports(f)]
    assert not inside, "import these at the top of the module:\n" + "\n".join(inside)


def test_adversarial_modules_form_no_loop():
    """Inside adversarial too: api runs exact's searches, so exact gets api's attack passed in."""
    graph: dict[str, set[str]] = {}
    for path in sorted((SRC / "adversarial").glob("*.py")):
        deps = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # imports inside functions count
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prunecert.adversarial."):
                deps.add(node.module.rsplit(".", 1)[1])
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import loop: " + " -> ".join(path + (module,))
        if module not in done:
            for dep in sorted(graph.get(module, ())):
                visit(dep, path + (module,))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())
