"""nettwin: keep network digital twins current while telemetry flows."""

from ingest.errors import ConfigError, InputError, NettwinError, ServiceError
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
