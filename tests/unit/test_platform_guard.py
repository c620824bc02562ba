import importlib
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_no_platform_package_init():
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_import_platform_is_stdlib():
    module = importlib.import_module("platform")
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(module.__file__).resolve().parent == stdlib
    assert callable(module.system) and module.python_version() == ".".join(map(str, sys.version_info[:3]))


def test_raylm_imports_from_platform_folder():
    import raylm

    assert Path(raylm.__file__).resolve().parent == REPO_ROOT / "platform" / "raylm"
