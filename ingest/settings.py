"""The one settings model. Precedence: CLI (init kwargs) > env (``NETTWIN_``, nested ``__``) > TOML file > defaults.

The TOML file is named by ``NETTWIN_CONFIG`` (or the CLI's ``--config``). Example::

    profile = "external"
    [kafka]
    bootstrap_servers = "broker-1:9092,broker-2:9092"
    topic_prefix = "prod."
    [influx]
    url = "https://influx.example:8086"
    database = "nettwin"
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from ingest.errors import ConfigError

Profile = Literal["local", "external"]


class KafkaSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    # partitions of the keyed data topics (telemetry, features); a square always maps to square % partitions
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # None: derived from the profile (6 s locally, where joining a group takes half of it; 30 s otherwise)
    session_timeout_ms: int | None = Field(default=None, ge=1000)

    def client_options(self) -> dict[str, Any]:
        """Connection options in kafka-python's spelling."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.ssl_cafile:
            opts["ssl_cafile"] = str(self.ssl_cafile)
        return opts


class InfluxSettings(BaseModel):
    """InfluxDB through its v1 HTTP API (/write line protocol, /query InfluxQL): served by 1.x, 2.x and 3.x."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "http://127.0.0.1:8086"
    database: str = "nettwin"
    retention_policy: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    # 2.x/3.x: sent as "Authorization: Token ..." (v1 compatibility endpoints accept it)
    token: SecretStr | None = None
    # 1.x lets us CREATE DATABASE; on 2.x/3.x create the bucket + DBRP mapping yourself and set this false
    create_database: bool = True
    timeout_s: float = Field(default=10.0, gt=0)
    # points per /write request; 5-10k measured best here
    batch_points: int = Field(default=10_000, ge=1)


class WorkerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # tumbling windows the worker emits, in seconds (10 minutes and one hour)
    windows_s: tuple[int, ...] = (600, 3600)
    # event time a window stays open past its end for late records when no watermark says otherwise
    allowed_lateness_s: int = Field(default=0, ge=0)


class SecuritySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # BS key registry (`nettwin keys create`): BS agents sign their updates, the store verifies them.
    # None: updates are not authenticated (any sender that knows a BS id can update its twin).
    keys_file: Path | None = None
    # the store rejects an update whose base twin is more than this many versions behind its cluster twin
    max_staleness: int = Field(default=500, ge=0)
    # how the store screens and aggregates updates (twin_store/federation/screening): temporal is nettwin's default
    defense: str = "temporal"
    # BS agents screen each square's hourly traffic online (robust z-score + drift detection) and leave
    # flagged hours out of local training; the flag is kept on the forecast outcome rows
    screen_traffic: bool = True


SourceType = Literal["mqtt", "http", "pm-files", "kafka-lineprotocol", "file"]


class SourceSettings(BaseModel):
    """One ``[[source]]`` table of the deployment config (``nettwin attach``); docs/sources.md has examples.

    Keys a type does not use are ignored by it; ``mapping`` is the ``[source.mapping]`` table for payloads
    that are not canonical records (see ``ingest.sources.record.Mapping``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    type: SourceType
    # http, and pm-files' "file ready" notifications: host:port to listen on
    listen: str | None = None
    # bearer token read from this environment variable (http); unset: no authentication
    token_env: str | None = None
    max_body_bytes: int = Field(default=16 << 20, ge=1024)
    # mqtt: mqtt://host:port or mqtts://host:port; kafka-lineprotocol: bootstrap servers (default: ours)
    url: str | None = None
    topics: tuple[str, ...] = ()
    format: Literal["json", "csv"] = "json"
    mapping: dict[str, Any] | None = None
    ca_file: Path | None = None
    username: str | None = None
    password_env: str | None = None
    qos: Literal[0, 1] = 1
    protocol: Literal["3.1.1", "5"] = "5"
    client_id: str | None = None
    # MQTT 5 shared subscription group: several attach processes split the topics ($share/<group>/...)
    shared_group: str | None = None
    max_message_bytes: int = Field(default=1 << 20, ge=64)
    # pm-files: watched directory, file name pattern, seconds a file must be unchanged before it is read
    directory: Path | None = None
    pattern: str = "*.xml"
    settle_s: float = Field(default=2.0, ge=0)
    poll_s: float = Field(default=1.0, gt=0)
    # file: the followed file (CSV with a header line, or JSON lines)
    path: Path | None = None
    # kafka-lineprotocol and http /v1/write: the tag naming the entity, timestamp precision, metric naming
    entity_tag: str = "host"
    precision: Literal["ns", "us", "ms", "s"] = "ns"
    metric_names: Literal["measurement_field", "field"] = "measurement_field"
    group_id: str | None = None
    # refuse records more than this many seconds ahead of the receive time
    max_future_s: float = Field(default=86_400.0, gt=0)
    # refuse records of entities not already in the registry
    registered_only: bool = False


class AttachSettings(BaseModel):
    """``[attach]``: the attach process's shared publisher."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # records accepted but not yet handed to Kafka, per process: beyond it HTTP answers 429, MQTT stops reading
    max_pending_records: int = Field(default=200_000, ge=1)


class RunSettings(BaseModel):
    """``[run]``: the parts ``nettwin run`` starts as child processes (attach only when sources exist)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    parts: tuple[Literal["attach", "store", "worker", "htwin", "edge-ledger", "cloud", "edge"], ...] = (
        "attach",
        "store",
        "worker",
    )
    restart_delay_s: float = Field(default=2.0, ge=0)


class SiteSettings(BaseModel):
    """An edge site (DITEN): a name, a position, and the samples per slot it can train."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    capacity: float = Field(gt=0)
    eps: float = Field(default=55.0, gt=0)  # eps_s of eq. 15
    energy: float = Field(default=7e3, gt=0)  # E_s of eq. 15, per-sample training energy


class EdgeSettings(BaseModel):
    """Edge sites and how BS twins are placed on them; the energy ledger's units (eqs. 13-15)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sites: tuple[SiteSettings, ...] = ()
    policy: Literal["nearest", "balanced", "learned"] = "nearest"
    slot_s: int = Field(default=3600, ge=1)  # one ledger slot (the stream's hour)
    sample_bytes: int = Field(default=250, ge=1)  # bytes one training sample occupies on the uplink
    twin_bytes: int = Field(default=18_000, ge=0)  # bytes of a BS twin's state (migrated with it)
    # policy "learned": the association saved by `nettwin bench diten --milan DIR --save-agent FILE`
    learned_model: Path | None = None
    # where BS positions come from: the Milan grid and OpenCellID files (`nettwin edge-ledger --milan-dir`)
    milan_dir: Path | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> EdgeSettings:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"edge site names must be unique, got {names}")
        return self


CADENCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
AGGREGATES = ("sum", "mean", "last", "max")


def cadence_seconds(text: str) -> int:
    """``"10m"`` -> 600. A cadence is 1m .. 1d and divides a day, so steps line up with days (and the epoch)."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if m is None:
        raise ValueError(f'cadence {text!r}: write a number and a unit s, m, h or d, e.g. "10m" or "1h"')
    seconds = int(m.group(1)) * CADENCE_UNITS[m.group(2)]
    if not 60 <= seconds <= 86_400:
        raise ValueError(f"cadence {text!r}: must lie between 1m and 1d")
    if 86_400 % seconds:
        raise ValueError(f"cadence {text!r}: must divide a day (e.g. 1m, 2m, 5m, 10m, 15m, 30m, 1h, 1d)")
    return seconds


class TwinsSettings(BaseModel):
    """``[twins]``: what the deployment twins and forecasts (docs/twins.md).

    Without ``target`` the worker twins Milan's replayed hourly traffic only (``nettwin vtwin --data``); with
    it, the worker windows the attached sources' ``telemetry`` records to ``cadence`` and the twins
    bootstrap from that history once ``bootstrap_entities`` entities have ``bootstrap_steps`` steps.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str | None = Field(default=None, min_length=1)  # the metric to twin and forecast
    cadence: str = "1h"  # the twins' step: raw records are windowed to it (tumbling, epoch-aligned)
    aggregate: Literal["sum", "mean", "last", "max"] = "mean"
    horizon: int = Field(default=1, ge=1, le=1000)  # forecast this many steps ahead
    sites: Path | None = None  # optional CSV: entity,lat,lon[,more attributes]
    # bootstrap: V-twinning starts once this many entities have enough history
    bootstrap_entities: int = Field(default=1, ge=1)
    # steps of history each of them needs; None: the inputs' longest lag plus a validation slice
    bootstrap_steps: int | None = Field(default=None, ge=2)
    # DCS clusters (at most one per entity); 0: as many as Louvain finds (fast at thousands of entities, where
    # Girvan-Newman to a fixed count takes minutes)
    clusters: int = Field(default=4, ge=0)
    # accepted local updates between DCS re-clusterings during the stream; None: 10 per bootstrapped entity
    # (each BS has reported about ten profiles since the last clustering); 0: never
    recluster_every: int | None = Field(default=None, ge=0)

    @field_validator("cadence")
    @classmethod
    def _cadence_is_valid(cls, value: str) -> str:
        cadence_seconds(value)  # ValueError -> a one-line ConfigError naming twins.cadence
        return value

    @property
    def cadence_s(self) -> int:
        return cadence_seconds(self.cadence)


class NettwinSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NETTWIN_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    profile: Profile = "local"
    kafka: KafkaSettings = KafkaSettings()
    influx: InfluxSettings = InfluxSettings()
    worker: WorkerSettings = WorkerSettings()
    security: SecuritySettings = SecuritySettings()
    # attached sources, the [[source]] tables of the config file
    source: tuple[SourceSettings, ...] = ()
    attach: AttachSettings = AttachSettings()
    run: RunSettings = RunSettings()
    edge: EdgeSettings = EdgeSettings()
    twins: TwinsSettings = TwinsSettings()
    # where processes keep local files (Faust data dir, logs of processes the demo starts)
    state_dir: Path = Path(".state")

    @property
    def session_timeout_ms(self) -> int:
        if self.kafka.session_timeout_ms is not None:
            return self.kafka.session_timeout_ms
        return 6_000 if self.profile == "local" else 30_000

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlFileSource(settings_cls))


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the TOML file named by NETTWIN_CONFIG; absent variable means no file."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("NETTWIN_CONFIG")
        if not path:
            return {}
        try:
            with open(path, "rb") as fh:
                return tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc})") from exc


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _source_of(loc: list[str], overrides: dict[str, Any]) -> str:
    """Where the value at ``loc`` came from, highest precedence first: CLI option, env variable, TOML file."""

    def holds(tree: Any) -> bool:
        for key in loc:
            if not isinstance(tree, dict) or key not in tree:
                return False
            tree = tree[key]
        return True

    env_name = "NETTWIN_" + "__".join(loc).upper()
    if holds(overrides):
        return "given on the command line"
    if any(k.upper() == env_name for k in os.environ):
        return f"env {env_name}"
    path = os.environ.get("NETTWIN_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                if holds(tomllib.load(fh)):
                    return f"config file {path}, key {'.'.join(loc)}"
        except (OSError, tomllib.TOMLDecodeError):
            pass
    return f"env {env_name}"


def load_settings(
    overrides: dict[str, Any] | None = None, config_file: Path | None = None
) -> NettwinSettings:
    """Build settings with CLI overrides on top, translating validation errors into one-line ConfigErrors.

    Nested overrides (``{"kafka": {"topic_prefix": "x."}}``) are merged with env and file values rather than
    replacing the whole section.
    """
    if config_file is not None:
        os.environ["NETTWIN_CONFIG"] = str(config_file)
    try:
        base = NettwinSettings()
        if not overrides:
            return base
        merged = _deep_merge(base.model_dump(), overrides)
        return NettwinSettings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        where = ".".join(loc)
        source = _source_of(loc, overrides or {})
        raise ConfigError(f"setting {where}: {first['msg']} ({source})") from exc
    except SettingsError as exc:
        # an env value of a list/table field that is not JSON, e.g. NETTWIN_WORKER__WINDOWS_S=600,3600
        field = re.search(r'field "(\w+)"', str(exc))
        prefix = f"NETTWIN_{field.group(1).upper()}" if field else "NETTWIN_"
        names = sorted(
            k.upper() for k in os.environ if k.upper().startswith(prefix) and k.upper() != "NETTWIN_CONFIG"
        )
        raise ConfigError(
            f"{exc}: {' '.join(str(exc.__cause__).split())} (env {', '.join(names)}; "
            "list and table values are JSON, e.g. [600, 3600])"
        ) from exc
