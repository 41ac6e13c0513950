"""Each package re-exports a short, sorted ``__all__`` whose every name resolves (the httpx habit)."""

from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = ("nettwin", "ingest", "producers", "stream_processors", "twin_store")


def _with_all() -> list[types.ModuleType]:
    modules = [importlib.import_module(name) for name in PACKAGES]
    return [m for m in modules if hasattr(m, "__all__")]


def test_nettwin_declares_its_public_surface() -> None:
    assert "nettwin" in [m.__name__ for m in _with_all()]


@pytest.mark.parametrize("module", _with_all(), ids=lambda m: m.__name__)
def test_all_is_sorted_unique_and_resolves(module: types.ModuleType) -> None:
    names = list(module.__all__)
    assert names, f"{module.__name__}.__all__ is empty"
    assert all(isinstance(n, str) for n in names)
    assert names == sorted(names), f"{module.__name__}.__all__ is not sorted"
    assert len(set(names)) == len(names), f"{module.__name__}.__all__ has duplicates"
    missing = [n for n in names if not hasattr(module, n)]
    assert missing == [], f"{module.__name__}.__all__ names what the package does not define: {missing}"


@pytest.mark.parametrize("module", _with_all(), ids=lambda m: m.__name__)
def test_all_is_complete(module: types.ModuleType) -> None:
    """Every public, non-module name the package binds (or binds lazily, listed in ``_LAZY``) is listed."""
    public = {
        n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
    } - {"annotations"}
    public |= set(getattr(module, "_LAZY", ()))
    assert public == set(module.__all__)


@pytest.mark.parametrize("module", _with_all(), ids=lambda m: m.__name__)
def test_star_import_gives_exactly_all(module: types.ModuleType) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module.__name__} import *", namespace)
    namespace.pop("__builtins__", None)
    assert set(namespace) == set(module.__all__)


def test_nettwin_exports_the_error_root_and_settings() -> None:
    import nettwin
    from ingest.errors import ConfigError, InputError, NettwinError, ServiceError
    from ingest.settings import NettwinSettings, load_settings

    assert nettwin.NettwinError is NettwinError
    assert all(issubclass(e, NettwinError) for e in (ConfigError, InputError, ServiceError))
    assert nettwin.ConfigError is ConfigError and nettwin.InputError is InputError
    assert nettwin.NettwinSettings is NettwinSettings and nettwin.load_settings is load_settings
