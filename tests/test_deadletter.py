"""Dead letters keep the original bytes and say where they came from."""

from __future__ import annotations

from types import SimpleNamespace

from ingest.deadletter import DeadLetter


def test_for_message_locates_a_consumed_message_and_round_trips_through_headers() -> None:
    msg = SimpleNamespace(topic="t.features.traffic", partition=3, offset=42, value=b"\x00raw")
    letter = DeadLetter.for_message(msg, "bad magic", "store")
    assert (letter.source, letter.position, letter.original, letter.stage) == (
        "t.features.traffic",
        "t.features.traffic[3]@42",
        b"\x00raw",
        "store",
    )
    assert DeadLetter.from_kafka(letter.original, letter.headers()) == letter
    empty = DeadLetter.for_message(
        SimpleNamespace(topic="x", partition=0, offset=0, value=None), "empty", "twins"
    )
    assert empty.original == b""
