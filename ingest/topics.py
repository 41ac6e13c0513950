"""Every topic the pipeline uses, with its partition count and cleanup policy, derived from settings.

Topics are created explicitly (``nettwin infra init``); nothing relies on broker auto-creation, whose
partition count differs between brokers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.settings import NettwinSettings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool
    purpose: str


@dataclass(frozen=True)
class Topics:
    telemetry_milan: str
    features_traffic: str
    deadletter: str
    twin_models: str
    updates_local: str
    forecasts: str
    updates_quarantine: str
    telemetry_sensors: str
    features_sensors: str
    telemetry_ftm: str
    telemetry_imu: str
    telemetry_vision_sim: str
    features_multimodal: str
    sites_ftm: str
    telemetry_records: str
    entities: str
    edge_sites: str
    features_twins: str

    @classmethod
    def from_settings(cls, settings: NettwinSettings) -> Topics:
        p = settings.kafka.topic_prefix
        return cls(
            telemetry_milan=f"{p}telemetry.milan",
            features_traffic=f"{p}features.traffic",
            deadletter=f"{p}deadletter",
            twin_models=f"{p}twin.models",
            updates_local=f"{p}updates.local",
            forecasts=f"{p}forecasts",
            updates_quarantine=f"{p}updates.quarantine",
            telemetry_sensors=f"{p}telemetry.sensors",
            features_sensors=f"{p}features.sensors",
            telemetry_ftm=f"{p}telemetry.ftm",
            telemetry_imu=f"{p}telemetry.imu",
            telemetry_vision_sim=f"{p}telemetry.vision_sim",
            features_multimodal=f"{p}features.multimodal",
            sites_ftm=f"{p}sites.ftm",
            telemetry_records=f"{p}telemetry.records",
            entities=f"{p}entities",
            edge_sites=f"{p}edge.sites",
            features_twins=f"{p}features.twins",
        )


def topic_specs(settings: NettwinSettings) -> list[TopicSpec]:
    t = Topics.from_settings(settings)
    n = settings.kafka.partitions
    return [
        TopicSpec(
            t.telemetry_milan, n, False, "Milan traffic records, batched, partition = square % partitions"
        ),
        TopicSpec(t.features_traffic, n, False, "closed per-square windows (10 min, 1 h), same partitioning"),
        TopicSpec(
            t.deadletter, 1, False, "invalid lines/messages: original bytes + reason/source/position headers"
        ),
        TopicSpec(
            t.twin_models, 1, True, "latest twin parameters per twin id (compacted), followed by BS agents"
        ),
        TopicSpec(t.updates_local, n, False, "per-BS local model updates for the twin store"),
        TopicSpec(t.forecasts, n, False, "BS agents' one-step forecasts and their outcomes, by square"),
        TopicSpec(
            t.updates_quarantine, 1, False, "local updates the store refused or quarantined, with the reason"
        ),
        TopicSpec(t.telemetry_sensors, n, False, "sensor readings, batched per source, key = source name"),
        TopicSpec(
            t.features_sensors, n, False, "screened sensor readings (value, score, flagged), same keys"
        ),
        TopicSpec(t.telemetry_ftm, n, False, "FTM ranging rows of replayed walks (JSON), key = device/walk"),
        TopicSpec(t.telemetry_imu, n, False, "IMU rows of replayed walks (JSON), key = device/walk"),
        TopicSpec(
            t.telemetry_vision_sim,
            n,
            False,
            "SIMULATED camera detections of replayed walks, key = device/walk",
        ),
        TopicSpec(
            t.features_multimodal,
            n,
            False,
            "per-device time-aligned FTM/IMU/vision windows (JSON, 2 s at 10 Hz + mask), key = device/walk",
        ),
        TopicSpec(
            t.sites_ftm,
            1,
            True,
            "AP positions per scene (JSON site metadata, compacted), key = scene, followed by the worker",
        ),
        TopicSpec(
            t.telemetry_records,
            n,
            False,
            "records of attached sources (batched, kind telemetry), partition = entity key % partitions",
        ),
        TopicSpec(
            t.entities,
            1,
            True,
            "entity registry (compacted): key = entity name, value = JSON {key, kind}; first claim wins",
        ),
        TopicSpec(
            t.edge_sites,
            1,
            False,
            "edge site heartbeats (JSON {site, at_ms, clusters, leaving}, key = site): who is alive, who holds what",
        ),
        TopicSpec(
            t.features_twins,
            n,
            False,
            "the [twins] metric of attached sources per entity and step (closed steps), same partitioning",
        ),
    ]
