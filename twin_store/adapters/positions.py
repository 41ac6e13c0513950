"""Live multimodal windows (``features.multimodal``, JSON, from the worker's ``multimodal`` agent) -> ``position``
points. Pure: no I/O.

One point per window that has a position to show, at the window's end (the walk's event time, ms precision).
Tags: ``entity`` (the window's key, ``device/walk``, as the topics key it), ``device`` and ``walk``. Fields:

- ``kf_x``, ``kf_y``: the range Kalman filter's position (the physical baseline), whenever the key's filter
  has started, with or without a stored positioning twin;
- ``x``, ``y``, ``alpha``, ``twin`` (string id), ``twin_version`` (int): the stored positioning twin's
  position, when the window carries one (``position`` is not null);
- ``fix_x``, ``fix_y``: the least-squares FTM fix, when the window has one (``mask["fix"]``).

A window with none of them (its scene's AP positions are not known yet) gives no point. Anything else that is
not a window as the worker writes it is a :class:`~ingest.schema.MalformedMessage` (a dead letter).
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from ingest.schema import MalformedMessage
from twin_store.adapters.lineproto import point

MEASUREMENT = "position"


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedMessage(f"{what} must be a finite number, got {value!r}"[:200])
    return float(value)


def _last_xy(steps: Any, what: str) -> tuple[float, float]:
    """The window's last step of an (x, y) channel."""
    if not isinstance(steps, list) or not steps or not isinstance(steps[-1], list) or len(steps[-1]) != 2:
        raise MalformedMessage(f"{what} must be a list of [x, y] steps")
    return _number(steps[-1][0], f"{what} x"), _number(steps[-1][1], f"{what} y")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f"{what} must be a non-empty string, got {value!r}"[:200])
    return value


def position_lines(value: bytes) -> list[str]:
    """The ``position`` line of one window (none when it has no position to show); MalformedMessage if bad."""
    try:
        w = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"multimodal window is not JSON: {exc}") from exc
    if not isinstance(w, dict):
        raise MalformedMessage("multimodal window must be a JSON object")
    key = _text(w.get("key"), "key")
    device, _, walk = key.partition("/")
    tags = {"entity": key, "device": w.get("device", device), "walk": w.get("walk", walk)}
    if not all(isinstance(v, str) for v in tags.values()):
        raise MalformedMessage("device and walk must be strings")
    end_ms = _number(w.get("end_ms"), "end_ms")
    mask = w.get("mask")
    if not isinstance(mask, dict):
        raise MalformedMessage("mask must be an object")
    fields: dict[str, object] = {}
    pos = w.get("position")
    if pos is not None:
        if not isinstance(pos, dict):
            raise MalformedMessage("position must be an object or null")
        fields["x"] = _number(pos.get("x"), "position x")
        fields["y"] = _number(pos.get("y"), "position y")
        fields["kf_x"] = _number(pos.get("kf_x"), "position kf_x")
        fields["kf_y"] = _number(pos.get("kf_y"), "position kf_y")
        fields["alpha"] = _number(pos.get("alpha"), "position alpha")
        fields["twin"] = _text(pos.get("twin"), "position twin")
        version = pos.get("version")
        if version is not None:  # windows of workers before the version was added have none
            if isinstance(version, bool) or not isinstance(version, int):
                raise MalformedMessage(f"position version must be an integer, got {version!r}"[:200])
            fields["twin_version"] = version
    elif mask.get("kf") is True:  # no twin: the filter alone, so a user always sees the baseline
        fields["kf_x"], fields["kf_y"] = _last_xy(w.get("kf"), "kf")
    if mask.get("fix") is True:
        fields["fix_x"], fields["fix_y"] = _last_xy(w.get("fix"), "fix")
    if not fields:
        return []
    return [point(MEASUREMENT, tags, fields, round(end_ms))]
