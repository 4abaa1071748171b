"""The package's layering (docs/design.md section 9): import-linter's contracts in pyproject.toml,
and no module, bench, test or example reaching into another module's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "segcompile"


def test_import_contracts_hold():
    pytest.importorskip("importlinter.cli", reason="pip install import-linter (the [test] extra)")
    # In a process of its own: import-linter configures logging with dictConfig, which disables
    # every logger that exists (segcompile's among them) for the rest of the process. It reads
    # [tool.importlinter] from pyproject.toml in its working directory.
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, f"import-linter found a broken contract:\n{run.stdout}{run.stderr}"


def private_uses(source: str, module: str | None = None) -> list[str]:
    """Where ``source`` uses a private name (``_x``, not ``__x__``) of another segcompile module:
    ``from segcompile... import _x`` (or a relative import, inside the package), ``m._x`` where ``m``
    was imported from segcompile, and ``setattr(m, "_x", ...)`` / ``monkeypatch.setattr(m, "_x", ...)``.
    ``module``: the dotted name of the package module ``source`` is, to resolve relative imports."""
    tree = ast.parse(source)
    bound: set[str] = set()  # local names of segcompile modules and objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and _from_package(node, module):
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"line {node.lineno}: imports {alias.name}")
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and _root_name(node.value) in bound:
            found.append(f"line {node.lineno}: uses {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and _is_setattr(node.func) and len(node.args) >= 2:
            target, name = node.args[0], node.args[1]
            if (_root_name(target) in bound and isinstance(name, ast.Constant) and isinstance(name.value, str)
                    and _is_private(name.value)):
                found.append(f"line {node.lineno}: sets {ast.unparse(target)}.{name.value}")
    return sorted(found, key=lambda line: int(line.split()[1].rstrip(':')))


def _from_package(node: ast.ImportFrom, module: str | None) -> bool:
    if node.level == 0:
        return (node.module or "").split(".")[0] == PACKAGE
    return module is not None  # a relative import inside the package


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_setattr(func: ast.AST) -> bool:
    return (isinstance(func, ast.Name) and func.id == "setattr") or (isinstance(func, ast.Attribute) and func.attr == "setattr")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources():
    for folder in (PACKAGE, "bench", "tests", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, _module_name(path) if folder == PACKAGE else None


@pytest.mark.parametrize("path,module", [pytest.param(p, m, id=str(p.relative_to(ROOT))) for p, m in _sources()])
def test_no_private_names_of_other_modules(path, module):
    assert private_uses(path.read_text(), module) == [], f"{path.relative_to(ROOT)} reaches into private names"


def test_the_private_name_check_can_fail():
    source = (
        "import segcompile.kernels.triton_attention as ta\n"
        "from segcompile.runtime import training\n"
        "from segcompile.kernels.problem import _hidden\n"
        "import torch\n"
        "ta._launch(1)\n"
        "monkeypatch.setattr(training, '_backward', None)\n"
        "torch._dynamo.reset()\n"
        "ta.__name__\n"
    )
    assert private_uses(source) == [
        "line 3: imports _hidden",
        "line 5: uses ta._launch",
        "line 6: sets training._backward",
    ]
    assert private_uses("from .triton_attention import _attend\n", "segcompile.kernels.triton_decode") == ["line 1: imports _attend"]
