"""nettwin: keep network digital twins current while telemetry flows."""

import typing as _typing

from ingest.errors import ConfigError, InputError, NettwinError, ServiceError

if _typing.TYPE_CHECKING:
    from ingest.settings import InfluxSettings, KafkaSettings, NettwinSettings, load_settings

__all__ = [
    "ConfigError",
    "InfluxSettings",
    "InputError",
    "KafkaSettings",
    "NettwinError",
    "NettwinSettings",
    "ServiceError",
    "load_settings",
]
# bound on first use (PEP 562): the settings model pulls in pydantic, which `nettwin --help` does not need
_LAZY = ("InfluxSettings", "KafkaSettings", "NettwinSettings", "load_settings")


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        import ingest.settings

        return getattr(ingest.settings, name)
    raise AttributeError(f"module 'nettwin' has no attribute {name!r}")
