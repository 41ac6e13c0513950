"""BS identities and keys: every local update is signed by its BS and verified by the twin store.

The registry is a JSON file ``{"scheme": "hmac-sha256", "keys": {"<bs id>": "<64 hex digits>"}}`` made by
``nettwin keys create`` and named by the setting ``security.keys_file``. HMAC-SHA256 is a shared secret:
the BS agents' host and the store both hold the file, so keep it readable by those two only (it is
written with mode 0600). A signature covers the whole message but the signature itself: the header (level,
BS id, version, model size), every meta field (sequence number, hour, cluster, base version, sample count,
loss, traffic profile, ...) and the parameter bytes. So nothing the store relies on can be changed, added or
replayed under another seq.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.errors import InputError
from twin_store.federation.models_topic import TwinMessage

SCHEME = "hmac-sha256"


def signed_bytes(update: TwinMessage) -> bytes:
    """Canonical bytes of everything in the message but ``meta["sig"]``: sorted-key JSON of the header and
    meta (JSON numbers round-trip exactly, so the store recomputes the same bytes from the decoded message)
    followed by the float32 parameters."""
    head = {
        "level": update.level,
        "twin_id": update.twin_id,
        "version": update.version,
        "hidden": update.hidden,
        "meta": {k: v for k, v in update.meta.items() if k != "sig"},
    }
    text = json.dumps(head, sort_keys=True, separators=(",", ":"))
    return text.encode() + b"|" + np.ascontiguousarray(update.params, "<f4").tobytes()


@dataclass(frozen=True)
class KeyRegistry:
    keys: dict[str, bytes]

    @classmethod
    def create(cls, ids: Iterable[str]) -> KeyRegistry:
        return cls({str(i): secrets.token_bytes(32) for i in ids})

    @classmethod
    def load(cls, path: Path) -> KeyRegistry:
        try:
            doc = json.loads(path.read_text())
        except OSError as exc:
            raise InputError(f"{path}: cannot read the key registry ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not a key registry (invalid JSON at line {exc.lineno})") from None
        if not isinstance(doc, dict) or doc.get("scheme") != SCHEME or not isinstance(doc.get("keys"), dict):
            raise InputError(f"{path}: not a key registry (needs scheme {SCHEME!r} and a keys object)")
        try:
            keys = {str(k): bytes.fromhex(v) for k, v in doc["keys"].items()}
        except (TypeError, ValueError):
            raise InputError(f"{path}: every key must be a hex string") from None
        if any(len(k) < 16 for k in keys.values()):
            raise InputError(f"{path}: keys must be at least 16 bytes")
        return cls(keys)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"scheme": SCHEME, "keys": {k: v.hex() for k, v in sorted(self.keys.items())}}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)

    def sign(self, update: TwinMessage) -> None:
        """Add ``meta["sig"]``; the BS must be in the registry."""
        key = self.keys.get(update.twin_id)
        if key is None:
            raise KeyError(f"BS {update.twin_id} has no key in the registry")
        update.meta["sig"] = hmac.new(key, signed_bytes(update), hashlib.sha256).hexdigest()

    def problem(self, update: TwinMessage) -> str | None:
        """Why the update is not authentic, or None if it is."""
        key = self.keys.get(update.twin_id)
        if key is None:
            return f"unknown BS {update.twin_id}: no key in the registry"
        sig = update.meta.get("sig")
        if not isinstance(sig, str):
            return "unsigned update"
        try:
            expected = hmac.new(key, signed_bytes(update), hashlib.sha256).hexdigest()
        except (TypeError, ValueError):  # meta that JSON cannot represent canonically
            return "bad signature"
        if not sig.isascii() or not hmac.compare_digest(sig, expected):
            return "bad signature"
        return None
