"""What the twin store accepts from topics and files: twin messages, local updates, signatures, the screen's
memory. Every defect is a MalformedMessage (a dead letter), never another exception."""

from __future__ import annotations

import contextlib
import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from river import drift, stats

from ingest.schema import MalformedMessage
from twin_store.federation.keys import KeyRegistry
from twin_store.federation.local_updates import profile_upto, snapshot_problem, update_problem
from twin_store.federation.models_topic import MAGIC, TwinMessage, decode_twin
from twin_store.federation.screening.base import Candidate
from twin_store.federation.screening.temporal import EwMean, RiseDetector, TemporalScreen
from twin_store.services.htwin import SCREEN_SAVE_S, TwinService, load_screen, save_screen


def update(**meta: object) -> TwinMessage:
    base = {"seq": 3, "hour": 3, "cluster": 1, "base_version": 2, "n_samples": 40, "loss": 0.5}
    return TwinMessage("bs", "17", 2, 4, np.arange(6, dtype=np.float32), base | meta)


def raw(header: dict[str, object], body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + body


GOOD_HEADER = {"level": "bs", "twin_id": "5", "version": 1, "hidden": 4, "n_params": 2, "meta": {}}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"twin_id": None}, "twin_id"),
        ({"twin_id": "a b"}, "twin_id"),
        ({"version": "x"}, "version"),
        ({"version": True}, "version"),
        ({"version": -1}, "version"),
        ({"hidden": 2.5}, "hidden"),
        ({"n_params": "2"}, "n_params"),
        ({"meta": [1, 2]}, "meta must be an object"),
        ({"meta": "x"}, "meta must be an object"),
    ],
)
def test_bad_headers_are_malformed(change: dict[str, object], reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        decode_twin(raw(GOOD_HEADER | change, b"\0" * 8))


def test_missing_twin_id_and_header_longer_than_message_are_malformed() -> None:
    header = {k: v for k, v in GOOD_HEADER.items() if k != "twin_id"}
    with pytest.raises(MalformedMessage, match="twin_id"):
        decode_twin(raw(header, b"\0" * 8))
    with pytest.raises(MalformedMessage, match="claims"):
        decode_twin(MAGIC + struct.pack("<I", 10**6) + b"{}")
    assert decode_twin(raw(GOOD_HEADER | {"twin_id": 5}, b"\0" * 8)).twin_id == "5"  # an integer id is fine


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_are_malformed(data: bytes) -> None:
    for candidate in (data, MAGIC + data, MAGIC + struct.pack("<I", len(data)) + data):
        with contextlib.suppress(MalformedMessage):
            decode_twin(candidate)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*sorted(GOOD_HEADER), "x"]), json_values), st.binary(max_size=16))
def test_random_headers_decode_or_are_malformed(header: dict[str, object], body: bytes) -> None:
    """Any header, with any value types: decode_twin returns a typed message or raises MalformedMessage, and
    a decoded update is then either accepted by update_problem or refused with a reason (no exception)."""
    try:
        msg = decode_twin(raw(GOOD_HEADER | header, body))
    except MalformedMessage:
        return
    assert isinstance(msg.meta, dict) and isinstance(msg.version, int) and isinstance(msg.twin_id, str)
    update_problem(msg)
    snapshot_problem(msg)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["seq", "hour", "n_samples", "base_version", "cluster", "loss", "profile"]),
        json_values,
    )
)
def test_random_update_meta_is_checked_without_exceptions(meta: dict[str, object]) -> None:
    u = update(**meta)
    problem = update_problem(u)
    if problem is None:  # what the store then relies on holds
        assert isinstance(u.meta["seq"], int) and u.meta["n_samples"] >= 1
        assert math.isfinite(float(u.meta.get("loss", 0.0)))  # type: ignore[arg-type]
        p = u.meta.get("profile")
        assert p is None or (isinstance(p, list) and len(p) == 24)


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"profile": [1.0, 2.0]}, "profile must be a list of 24"),
        ({"profile": [float("nan")] * 24}, "profile"),
        ({"profile": "flat"}, "profile"),
        ({"hour": "x"}, "hour"),
        ({"hour": -3}, "hour"),
        ({"cluster": [1]}, "cluster"),
        ({"seq": None}, "seq"),
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 10**30}, "n_samples"),
        ({"loss": "low"}, "loss"),
        ({"loss": float("inf")}, "loss"),
    ],
)
def test_update_problems(meta: dict[str, object], reason: str) -> None:
    problem = update_problem(update(**meta))
    assert problem is not None and reason in problem
    assert update_problem(update(profile=profile_upto(np.ones(48), 47))) is None


def test_non_ascii_digits_are_not_square_numbers() -> None:
    u = update()
    u.twin_id = "²"  # str.isdigit() says yes, int() says no
    assert update_problem(u) == "BS id '²' is not a square number"


def test_signature_covers_every_field_the_store_relies_on() -> None:
    keys = KeyRegistry.create(["17"])
    signed = update(profile=[0.5] * 24)
    keys.sign(signed)
    assert keys.problem(decode_twin(signed.encode())) is None
    for field, value in [
        ("profile", [1.0, 2.0]),
        ("hour", 99),
        ("cluster", 4),
        ("loss", 0.25),
        ("n_samples", 41),
        ("seq", 4),
        ("base_version", 3),
        ("extra", 1),
    ]:
        tampered = decode_twin(signed.encode())
        tampered.meta[field] = value
        assert keys.problem(tampered) == "bad signature", field
    tampered = decode_twin(signed.encode())
    tampered.params[0] += 1
    assert keys.problem(tampered) == "bad signature"
    tampered = decode_twin(signed.encode())
    tampered.meta["sig"] = "é" * 64  # not hex: refused, not a TypeError from compare_digest
    assert keys.problem(tampered) == "bad signature"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=60), st.sampled_from([0.1, 0.5, 0.9]))
def test_detectors_equal_rivers(xs: list[float], fading: float) -> None:
    ours_mean, river_mean = EwMean(fading), stats.EWMean(fading_factor=fading)
    ours_rise = RiseDetector(min_instances=3, delta=0.2, threshold=1.0)
    river_rise = drift.PageHinkley(min_instances=3, delta=0.2, threshold=1.0, mode="up")
    for x in xs:
        ours_mean.update(x)
        river_mean.update(x)
        ours_rise.update(x)
        river_rise.update(x)
        assert ours_mean.get() == pytest.approx(river_mean.get(), rel=1e-12, abs=1e-12)
        assert ours_rise.drift_detected == river_rise.drift_detected


def screened(screen: TemporalScreen, rounds: int, start: int = 0) -> list[tuple[bool, float]]:
    gen = torch.Generator().manual_seed(start)
    reference = torch.zeros(8)
    out = []
    for r in range(start, start + rounds):
        for s in range(6):
            scale = 8.0 if (s == 5 and r >= 4) else 1.0  # BS 5 turns into a booster
            params = reference + scale * torch.randn(8, generator=gen)
            v = screen.screen(Candidate(s, 0, params, reference, tuple(range(6)), 30, 0.1, r))
            out.append((v.accepted, v.score))
    return out


def test_screen_memory_survives_a_restart_as_plain_arrays(tmp_path: Path) -> None:
    straight = TemporalScreen()
    screened(straight, 4)
    expected = screened(straight, 4, start=4)

    first = TemporalScreen()
    screened(first, 4)
    path = tmp_path / "screen.npz"
    save_screen(path, first)
    with np.load(path, allow_pickle=False) as f:  # no object arrays: loadable without pickle
        assert {f[k].dtype.kind for k in f.files} <= {"u", "i", "f"}
    restored = load_screen(path, TemporalScreen, 8)
    assert isinstance(restored, TemporalScreen)
    assert screened(restored, 4, start=4) == expected
    assert any(not accepted for accepted, _ in expected)  # the memory mattered: something was quarantined


def test_the_screen_memory_is_saved_at_most_every_few_seconds_and_at_stop(tmp_path: Path) -> None:
    """Writing every BS's last change after every poll held the store back at thousands of BSs."""
    from types import SimpleNamespace

    service = object.__new__(TwinService)  # only what keep_screen uses: no services needed
    screen = TemporalScreen()
    service.state = SimpleNamespace(defense=screen)  # type: ignore[assignment]
    service.screen_file = tmp_path / "screen.npz"
    service.screen_saved, service.screen_unsaved = time.monotonic(), True
    service.keep_screen()
    assert not service.screen_file.exists()  # saved less than SCREEN_SAVE_S ago: later
    service.keep_screen(now=True)  # at stop
    assert service.screen_file.exists() and not service.screen_unsaved
    service.screen_file.unlink()
    service.screen_saved -= SCREEN_SAVE_S
    service.keep_screen()
    assert not service.screen_file.exists()  # nothing decided since
    service.screen_unsaved = True
    service.keep_screen()
    assert service.screen_file.exists()


def test_unusable_screen_memory_means_warming_up_again(tmp_path: Path) -> None:
    path = tmp_path / "screen.npz"
    assert load_screen(path, TemporalScreen, 8) is None  # none yet
    path.write_bytes(b"\x80\x04junk")  # e.g. an old pickle
    assert load_screen(path, TemporalScreen, 8) is None
    screen = TemporalScreen()
    screened(screen, 2)
    save_screen(path, screen)
    assert load_screen(path, TemporalScreen, 9) is None  # tensors of another model size
    np.savez(
        path,
        doc=np.frombuffer(b'{"format": 1, "defense": "temporal", "state": []}', np.uint8),
        squares=np.zeros(0, np.int64),
        tensors=np.zeros((0, 8), np.float32),
    )
    assert load_screen(path, TemporalScreen, 8) is None


def test_parameters_beyond_any_model_are_refused_before_use() -> None:
    # a bit flip gave one weight 1e38: finite, but its square overflows the divergence and every row after it
    u = update()
    u.params = np.array([0.5, -1.0, 1e38], np.float32)
    assert "within" in (update_problem(u) or "")
    u.params = np.array([0.5, -1.0, 3.0], np.float32)
    assert update_problem(u) is None
