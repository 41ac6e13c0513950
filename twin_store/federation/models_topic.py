"""Twin parameters on the compacted ``twin.models`` topic: the latest message per key is each twin's state.

Key ``{level}:{twin_id}`` (``global:0``, ``cluster:3``, ``bs:1042``). Value::

    b"NTM1" | u32 header_len | header JSON | float32[n_params]

The header names the level, id, version, model size and whatever the followers need with it (members,
per-square scaling statistics).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ingest.schema import MalformedMessage

MAGIC = b"NTM1"
_U32 = struct.Struct("<I")
LEVELS = ("bs", "cluster", "global")


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
    if len(data) < 8 or data[:4] != MAGIC:
        raise MalformedMessage("not a nettwin twin message (bad magic)")
    (hlen,) = _U32.unpack_from(data, 4)
    try:
        h = json.loads(data[8 : 8 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"twin header is not JSON: {exc}") from exc
    if not isinstance(h, dict) or h.get("level") not in LEVELS:
        raise MalformedMessage("twin header: unknown level")
    body = data[8 + hlen :]
    n = h.get("n_params")
    if not isinstance(n, int) or len(body) != 4 * n:
        raise MalformedMessage(f"twin body has {len(body)} bytes, header says {n} float32 parameters")
    return TwinMessage(
        h["level"],
        str(h["twin_id"]),
        int(h["version"]),
        int(h["hidden"]),
        np.frombuffer(body, "<f4").copy(),
        h.get("meta") or {},
    )
