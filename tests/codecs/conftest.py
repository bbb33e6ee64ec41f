"""Reference implementations for the codec cross-checks: adafactor8bit 0.4.6 and 0.2.2.

0.4.6 is a test dependency and is imported normally. 0.2.2 cannot be installed next to it, so the
``a8_022`` fixture loads its wheel from a private directory under another module name:

1. ``tests/codecs/_vendor_a8_022/adafactor8bit/`` if present (for offline runs; git-ignored);
2. otherwise ``pip install --no-deps --target <dir> adafactor8bit==0.2.2`` into pytest's cache
   directory (kept between runs) or, when the cache plugin is disabled, a session temporary
   directory.

Tests that need it are skipped, with pip's message, only when that install fails.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

_VENDOR = Path(__file__).parent / "_vendor_a8_022"
_ALIAS = "adafactor8bit_0_2_2"


def _import_package_as(alias: str, package_dir: Path) -> ModuleType:
    """Imports the package in ``package_dir`` as ``alias`` and returns ``alias.optimizer``."""
    if alias not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            alias, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[alias] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[alias]
            raise
    return importlib.import_module(f"{alias}.optimizer")


def _install_target(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("adafactor8bit-0.2.2"))
    return tmp_path_factory.mktemp("adafactor8bit-0.2.2")


@pytest.fixture(scope="session")
def a8_022(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The ``optimizer`` module of adafactor8bit 0.2.2, imported under a private name."""
    if (_VENDOR / "adafactor8bit" / "optimizer.py").is_file():
        return _import_package_as(_ALIAS, _VENDOR / "adafactor8bit")
    target = _install_target(request, tmp_path_factory)
    if not (target / "adafactor8bit" / "optimizer.py").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--target", str(target), "adafactor8bit==0.2.2"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot install adafactor8bit==0.2.2 for the cross-check: {exc}")
        if proc.returncode != 0:
            pytest.skip("cannot install adafactor8bit==0.2.2 for the cross-check "
                        f"(pip exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    return _import_package_as(_ALIAS, target / "adafactor8bit")


@pytest.fixture(scope="session")
def a8_046() -> ModuleType:
    """The ``optimizer`` module of the installed adafactor8bit, which must be 0.4.6."""
    try:
        version = importlib.metadata.version("adafactor8bit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("adafactor8bit 0.4.6 is not installed (pip install adafactor8bit==0.4.6)")
    if version != "0.4.6":
        pytest.skip(f"the cross-check targets adafactor8bit 0.4.6, found {version}")
    return importlib.import_module("adafactor8bit.optimizer")
