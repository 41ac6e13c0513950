"""Create (and for tests/benchmarks, remove) what a deployment needs: the InfluxDB database and every topic."""

from __future__ import annotations

from ingest.kafka import create_topics, delete_topics
from ingest.settings import NettwinSettings
from ingest.topics import topic_specs
from twin_store.adapters.influx import InfluxClient


def provision(settings: NettwinSettings) -> tuple[str, dict[str, str]]:
    """Check InfluxDB answers, create the database (unless disabled) and every topic.

    Returns the InfluxDB version and 'created'/'exists' per topic. Idempotent.
    """
    with InfluxClient(settings.influx) as influx:
        version = influx.ping()
        if settings.influx.create_database:
            influx.create_database()
    return version, create_topics(settings, topic_specs(settings))


def deprovision(settings: NettwinSettings) -> None:
    """Delete every topic and drop the database: for the throwaway deployments of tests and benchmarks."""
    delete_topics(settings, [s.name for s in topic_specs(settings)])
    with InfluxClient(settings.influx) as influx:
        influx.drop_database(settings.influx.database)
