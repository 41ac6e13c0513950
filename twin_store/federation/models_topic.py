"""Twin parameters on the compacted ``twin.models`` topic: the latest message per key is each twin's state.

Key ``{level}:{twin_id}`` (``global:0``, ``cluster:3``, ``bs:1042``). Value::

    b"NTM1" | u32 header_len | header JSON | float32[n_params]

The header names the level, id, version, model size and whatever the followers need with it (members,
per-square scaling statistics).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ingest.schema import MalformedMessage

MAGIC = b"NTM1"
_U32 = struct.Struct("<I")
LEVELS = ("bs", "cluster", "global")
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


def decode_twin(data: bytes) -> TwinMessage:
    """Decode and type-check a twin message; any defect raises MalformedMessage (never another error)."""
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
    body = data[8 + hlen :]
    n = h["n_params"]
    if len(body) != 4 * n:
        raise MalformedMessage(f"twin body has {len(body)} bytes, header says {n} float32 parameters")
    return TwinMessage(
        h["level"], twin_id, h["version"], h["hidden"], np.frombuffer(body, "<f4").copy(), meta
    )


def is_int(value: object, low: int = -MAX_INT) -> bool:
    """A JSON integer (not a bool) in ``[low, MAX_INT)``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < MAX_INT
