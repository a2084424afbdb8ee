"""The package's layers and public surfaces: the import contracts (`lint-imports`, pyproject.toml) and
"plugins import from core only the names a core module lists in `__all__`"."""

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _core_imports_outside_core():
    """(file, line, module, name) of every `from gendistill.core... import name` outside gendistill.core."""
    for path in sorted((ROOT / "gendistill").rglob("*.py")):
        if path.is_relative_to(ROOT / "gendistill" / "core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gendistill.core"):
                for alias in node.names:
                    yield path.relative_to(ROOT), node.lineno, node.module, alias.name


def test_plugins_import_only_public_core_names():
    bad = []
    for path, line, module, name in _core_imports_outside_core():
        public = getattr(importlib.import_module(module), "__all__", None)
        if public is None or name not in public:
            bad.append(f"{path}:{line} imports {name} from {module}" + (" (no __all__)" if public is None else ""))
    assert not bad, "\n".join(bad)


def test_import_layers_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    run = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
