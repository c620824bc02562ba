"""The import graph is read from the tops of the files (docs/architecture.md).

Three checks over raylm's own source: the import-linter layers contract in
pyproject.toml holds (no import climbs a layer, no cycle between layers); no
function-local import between raylm's own modules outside the CLI; no private
name (``_x``) imported from another raylm module.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "platform" / "raylm"
# The CLI alone may defer importing the heavy layers, for a fast `raylm --help`.
LAZY_IMPORTS_ALLOWED = set((PACKAGE / "cli").glob("*.py"))


def _modules():
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def _raylm_imports(tree: ast.AST, path: Path):
    """(node, imported module, imported names) for every import of a raylm module in ``tree``."""
    package = ".".join(path.relative_to(ROOT / "platform").with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "raylm" or alias.name.startswith("raylm."):
                    yield node, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: -node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "raylm" or module.startswith("raylm."):
                yield node, module, [alias.name for alias in node.names]


def test_layers_contract_holds():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(lint).exists():
        pytest.fail("lint-imports is missing: install the dev extras (pip install -e '.[dev]')")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "platform")})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_no_function_local_imports_between_raylm_modules():
    offenders = []
    for path in _modules():
        if path in LAZY_IMPORTS_ALLOWED:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = set()
        for statement in tree.body:
            # `if TYPE_CHECKING:` and `try:` blocks at module level are still read from the top.
            for node in ast.walk(statement) if isinstance(statement, (ast.If, ast.Try)) else [statement]:
                top_level.add(node)
        for node, module, _ in _raylm_imports(tree, path):
            if node not in top_level:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module} inside a function")
    assert not offenders, "\n".join(offenders)


def test_no_private_names_cross_modules():
    offenders = []
    for path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, module, names in _raylm_imports(tree, path):
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}.{name}")
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_a_function_local_import(tmp_path):
    source = "def f():\n    from raylm.common import storage\n    return storage\n"
    tree = ast.parse(source)
    fake = PACKAGE / "common" / "example.py"
    found = [module for node, module, _ in _raylm_imports(tree, fake) if node not in set(tree.body)]
    assert found == ["raylm.common"]
