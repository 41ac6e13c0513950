"""Twin parameters on the compacted ``twin.models`` topic: the latest message per key is each twin's state.

Key ``{level}:{twin_id}`` (``global:0``, ``cluster:3``, ``bs:1042``, ``roster:0``). Value::

    b"NTM1" | u32 header_len | header JSON | float32[n_params]

The header names the level, id, version, model size and whatever the followers need with it.

The **roster** (key ``roster:0``, no parameters) holds what is per entity and static between V-twinnings:
``members`` (every entity key), ``scaler`` (key -> [mean, std]), and optionally ``entities`` (key -> name)
and ``cluster_profiles`` (cluster id -> mean profile). It is published once with the twins it belongs to,
before them, and again only when it changes. htwin's bootstrap publishes it before it trains the twins, with
their stream ``plan``, so the BS agents can record the steps they keep meanwhile (``BsAgents.record_kept``).
The global twin's meta stays small (plan, inputs, loss, ...) and names the roster it goes with (``roster``:
its version), so a global merge costs the parameters and a few hundred bytes at any number of entities, not
every entity's statistics. A reader keeps the last roster that decoded (a malformed one is refused by
``decode_twin``); a global published before this protocol still carries the roster's fields itself, and
``roster_meta`` reads either.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ingest.schema import MalformedMessage

MAGIC = b"NTM1"
_U32 = struct.Struct("<I")
LEVELS = ("bs", "cluster", "global", "roster")
ROSTER_KEY = b"roster:0"
ROSTER_VERSION = 1  # V-twinning's roster; a later change of the entities publishes the next version
# the global's meta fields that moved to the roster (per entity: O(entities) bytes)
ROSTER_FIELDS = ("members", "scaler", "entities", "cluster_profiles")
# integers in headers and meta stay exact in JSON readers and fit InfluxDB's int64 fields
MAX_INT = 2**53
_TWIN_ID = re.compile(r"[0-9A-Za-z_.-]{1,64}")


@dataclass
class TwinMessage:
    level: str
    twin_id: str
    version: int
    hidden: int
    params: np.ndarray  # float32 [n_params]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        return f"{self.level}:{self.twin_id}".encode()

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "level": self.level,
                "twin_id": self.twin_id,
                "version": self.version,
                "hidden": self.hidden,
                "n_params": int(self.params.size),
                "meta": self.meta,
            },
            separators=(",", ":"),
        ).encode()
        return MAGIC + _U32.pack(len(header)) + header + np.ascontiguousarray(self.params, "<f4").tobytes()


def cluster_membership(clusters: Iterable[TwinMessage]) -> dict[int, int]:
    """square -> cluster id from cluster twins' member lists; a square listed twice (a re-clustering
    seen half-way) belongs to the cluster of the later epoch."""
    out: dict[int, tuple[int, int]] = {}
    for msg in clusters:
        epoch = int(msg.meta.get("epoch", 0))
        for s in msg.meta.get("members", []):
            if int(s) not in out or out[int(s)][1] <= epoch:
                out[int(s)] = (int(msg.twin_id), epoch)
    return {s: c for s, (c, _) in out.items()}


def decode_twin(data: bytes, skip_params: Collection[str] = ()) -> TwinMessage:
    """Decode and type-check a twin message; any defect raises MalformedMessage (never another error). A
    message of a level in ``skip_params`` is checked whole but comes with no parameters (an empty array): for
    readers of its header only."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise MalformedMessage("not a nettwin twin message (bad magic)")
    (hlen,) = _U32.unpack_from(data, 4)
    if hlen > len(data) - 8:
        raise MalformedMessage(f"twin header claims {hlen} bytes, the message has {len(data) - 8}")
    try:
        h = json.loads(data[8 : 8 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedMessage(f"twin header is not JSON: {exc}") from exc
    if not isinstance(h, dict) or h.get("level") not in LEVELS:
        raise MalformedMessage("twin header: unknown level")
    twin_id = h.get("twin_id")
    if is_int(twin_id):
        twin_id = str(twin_id)
    if not isinstance(twin_id, str) or not _TWIN_ID.fullmatch(twin_id):
        raise MalformedMessage(f"twin header: twin_id must be 1-64 letters, digits, '_.-', got {twin_id!r}")
    for name in ("version", "hidden", "n_params"):
        if not is_int(h.get(name), 0):
            raise MalformedMessage(f"twin header: {name} must be an integer >= 0, got {h.get(name)!r}")
    meta = h.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise MalformedMessage(f"twin header: meta must be an object, got {type(meta).__name__}")
    n, body_len = h["n_params"], len(data) - 8 - hlen
    if body_len != 4 * n:
        raise MalformedMessage(f"twin body has {body_len} bytes, header says {n} float32 parameters")
    if h["level"] == "roster":
        problem = roster_problem(meta) if n == 0 else f"a roster has no parameters, this one has {n}"
        if problem is not None:
            raise MalformedMessage(f"roster: {problem}")
    skip = h["level"] in skip_params
    params = np.zeros(0, np.float32) if skip else np.frombuffer(data, "<f4", n, 8 + hlen).copy()
    return TwinMessage(h["level"], twin_id, h["version"], h["hidden"], params, meta)


def is_int(value: object, low: int = -MAX_INT) -> bool:
    """A JSON integer (not a bool) in ``[low, MAX_INT)``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < MAX_INT


def split_roster(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A global meta as V-twinning builds it -> (the global's own small meta, the roster's meta)."""
    small = {k: v for k, v in meta.items() if k not in ROSTER_FIELDS}
    return small, {k: meta[k] for k in ROSTER_FIELDS if k in meta}


def roster_message(version: int, meta: dict[str, Any]) -> TwinMessage:
    return TwinMessage("roster", "0", version, 0, np.zeros(0, np.float32), meta)


def roster_meta(glob: TwinMessage | None, roster: TwinMessage | None) -> dict[str, Any] | None:
    """The roster fields that go with ``glob``: the roster's, or those a global of the former protocol carried
    itself; None while there is none yet (the roster has not arrived)."""
    if roster is not None:
        return roster.meta
    if glob is not None and "scaler" in glob.meta:
        return glob.meta
    return None


def roster_problem(meta: dict[str, Any]) -> str | None:
    """Why a roster's meta is unusable (types, every member scaled), or None."""
    members = meta.get("members")
    if not isinstance(members, list) or not all(is_int(m, 0) for m in members):
        return "members must be a list of entity keys (integers >= 0)"
    scaler = meta.get("scaler")
    if not isinstance(scaler, dict):
        return "scaler must be an object of key -> [mean, std]"
    for key, stats in scaler.items():
        if not (
            isinstance(stats, list) and len(stats) == 2 and all(_finite(v) for v in stats) and stats[1] > 0
        ):
            return f"scaler of {key}: must be [mean, std] finite with std > 0, got {str(stats)[:60]}"
    missing = [m for m in members if str(m) not in scaler]
    if missing:
        return f"{len(missing)} members have no scaler (first: {missing[0]})"
    entities = meta.get("entities", {})
    if not isinstance(entities, dict) or not all(isinstance(v, str) for v in entities.values()):
        return "entities must be an object of key -> name"
    profiles = meta.get("cluster_profiles", {})
    if not isinstance(profiles, dict) or not all(
        k.isascii() and k.isdecimal() and isinstance(p, list) and all(_finite(v) for v in p)
        for k, p in profiles.items()
    ):
        return "cluster_profiles must be an object of cluster id -> list of finite numbers"
    return None


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
