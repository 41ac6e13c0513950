"""Per-(topic, partition) agent state: valid only for the messages it saw, in order, while owned."""

from __future__ import annotations

import pytest

from ingest.schema import MalformedMessage
from stream_processors.agents.bs_twins import hourly_batch
from stream_processors.partitions import PartitionStates, get_or_build


def test_a_state_follows_its_partition_and_is_dropped_when_revoked() -> None:
    states: PartitionStates[list[int]] = PartitionStates()
    a = get_or_build(states, "milan", 0, 0, list)
    b = get_or_build(states, "milan", 1, 0, list)
    assert a is not b  # same partition number of another partition: its own state
    assert get_or_build(states, "sensors", 0, 0, list) is not a  # same number, other topic
    states.advance("milan", 0, 0)
    assert states.get("milan", 0, 1) is a
    states.revoke([("milan", 0)])
    assert states.get("milan", 0, 1) is None
    assert states.get("milan", 1, 0) is b


def test_a_rewind_to_an_earlier_offset_starts_over() -> None:
    """After a rebalance gave the partition back, Faust re-delivers from the committed offset."""
    states: PartitionStates[list[int]] = PartitionStates()
    state = get_or_build(states, "milan", 0, 10, list)
    for offset in range(10, 20):
        states.advance("milan", 0, offset)
    assert states.get("milan", 0, 20) is state
    assert states.get("milan", 0, 15) is None
    assert states.get("milan", 0, 20) is None  # dropped for good


def test_a_state_built_across_a_revocation_is_not_installed() -> None:
    states: PartitionStates[list[int]] = PartitionStates()
    epoch = states.epoch
    states.revoke([("features", 3)])  # while the state was being rebuilt
    assert not states.put("features", 3, [], 40, epoch)
    assert states.get("features", 3, 40) is None
    assert states.put("features", 3, [], 40, states.epoch)


def test_an_assignment_keeps_only_the_assigned_partitions_and_aliases_name_shared_states() -> None:
    states: PartitionStates[str] = PartitionStates(aliases={"ftm": "mm", "imu": "mm"})
    states.put("mm", 0, "zero", 0)
    states.put("mm", 1, "one", 0)
    states.keep_only([("ftm", 1), ("imu", 1)])
    assert states.get("mm", 0) is None and states.get("mm", 1) == "one"
    states.revoke([("imu", 1)])
    assert len(states) == 0


def test_a_null_message_on_the_hourly_topic_is_malformed_not_a_crash() -> None:
    with pytest.raises(MalformedMessage, match="empty message value"):
        hourly_batch(None)
    with pytest.raises(MalformedMessage, match="bad magic"):
        hourly_batch(b"")


def test_building_the_worker_loads_no_model_library() -> None:
    """Agents with nothing to do cost nothing: torch, river and networkx load with the first twin or
    reading, not at start-up (they made the worker's start-up seconds longer, issue 16)."""
    import subprocess
    import sys
    import tempfile

    code = (
        "import sys; from ingest.settings import load_settings; from stream_processors.worker import build_app; "
        "build_app(load_settings({'state_dir': sys.argv[1]})); "
        "print(sorted(m for m in ('torch', 'river', 'networkx', 'scipy') if m in sys.modules))"
    )
    with tempfile.TemporaryDirectory() as state:
        res = subprocess.run([sys.executable, "-c", code, state], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
