"""Attached telemetry sources: canonical records, pure parsers, and the adapters of ``nettwin attach``.

Pure (no Kafka): ``record`` (canonical record, JSON/CSV + mapping), ``lineprotocol``, ``pm_xml``, ``wire``.
Adapters: ``http``, ``mqtt``, ``pm_files``, ``kafka_lineprotocol``, ``file_follow``, sharing ``publisher``
and ``registry``; ``attach`` assembles them from the ``[[source]]`` tables of the config.
"""

from ingest.sources.record import Limits, Mapping, Parsed, Record, RecordError, Refusal

__all__ = ["Limits", "Mapping", "Parsed", "Record", "RecordError", "Refusal"]
