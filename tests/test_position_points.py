"""Live multimodal windows -> ``position`` points (twin_store/adapters/positions.py): the twin's position, the
filter's alone when no twin is stored, nothing when neither runs yet, and every defect a MalformedMessage."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.schema import MalformedMessage
from twin_store.adapters.positions import position_lines


def window(**change: Any) -> dict[str, Any]:
    w: dict[str, Any] = {
        "key": "M2/CarPark__5__524",
        "device": "M2",
        "walk": "CarPark__5__524",
        "end_ms": 4900.0,
        "mask": {"ftm": True, "imu": True, "vision": False, "fix": True, "kf": True},
        "fix": [[0.0, 0.0]] * 19 + [[1.25, -2.5]],
        "kf": [[0.0, 0.0]] * 19 + [[1.5, -2.0]],
        "position": {
            "x": 1.6,
            "y": -2.1,
            "kf_x": 1.5,
            "kf_y": -2.0,
            "twin": "position<-position+tracking/gating",
            "version": 3,
            "alpha": 0.5,
        },
    }
    return w | change


def lines(w: Any) -> list[str]:
    return position_lines(json.dumps(w).encode())


def test_a_positioned_window_is_one_point_at_its_end_with_the_twin_filter_and_fix() -> None:
    (line,) = lines(window())
    assert line == (
        "position,device=M2,entity=M2/CarPark__5__524,walk=CarPark__5__524 "
        'x=1.6,y=-2.1,kf_x=1.5,kf_y=-2.0,alpha=0.5,twin="position<-position+tracking/gating",twin_version=3i,'
        "fix_x=1.25,fix_y=-2.5 4900"
    )


def test_without_a_twin_the_filter_is_written_and_without_a_filter_or_fix_nothing() -> None:
    (line,) = lines(window(position=None))
    assert line.endswith(" kf_x=1.5,kf_y=-2.0,fix_x=1.25,fix_y=-2.5 4900")
    (line,) = lines(window(position=None, mask={"fix": True, "kf": False}))
    assert line.endswith(" fix_x=1.25,fix_y=-2.5 4900")
    assert lines(window(position=None, mask={"ftm": True, "fix": False, "kf": False})) == []
    no_version = window()
    del no_version["position"]["version"]  # a window of a worker before the version was carried
    assert "twin_version" not in lines(no_version)[0]


@pytest.mark.parametrize(
    ("w", "reason"),
    [
        ([1, 2], "JSON object"),
        (window(key=""), "key"),
        (window(key=7), "key"),
        (window(end_ms="5"), "end_ms"),
        (window(end_ms=True), "end_ms"),
        (window(mask=None), "mask"),
        (window(device=3), "device and walk"),
        (window(position=[1, 2]), "position must be an object"),
        (window(position=window()["position"] | {"x": "1"}), "position x"),
        (window(position=window()["position"] | {"twin": None}), "position twin"),
        (window(position=window()["position"] | {"version": 2.5}), "version"),
        (window(position=None, kf=[]), "kf must be a list"),
        (window(position=None, kf=[[1.0]]), "kf must be a list"),
        (window(fix=[[1.0, None]]), "fix y"),
    ],
)
def test_bad_windows_are_malformed(w: Any, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        lines(w)


def test_non_json_and_non_finite_values_are_malformed() -> None:
    with pytest.raises(MalformedMessage, match="not JSON"):
        position_lines(b"\xff{")
    with pytest.raises(MalformedMessage, match="not JSON"):  # NaN is not JSON (Python writes it anyway)
        position_lines(json.dumps(window(end_ms=float("nan"))).encode())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(window())), json_values, max_size=8))
def test_any_json_window_gives_lines_or_is_malformed(change: dict[str, Any]) -> None:
    with contextlib.suppress(MalformedMessage):
        position_lines(json.dumps(window(**change)).encode())
