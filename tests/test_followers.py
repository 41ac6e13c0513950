"""The worker's topic followers on the real broker: read to the end offsets, never die silently."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.kafka import make_producer
from ingest.settings import NettwinSettings, load_settings
from ingest.topics import Topics
from stream_processors.bs_agents import TwinVersions
from stream_processors.followers import TwinFollower
from tests.conftest import wait_until
from twin_store.federation.models_topic import TwinMessage

pytestmark = pytest.mark.integration


def test_twin_follower_is_caught_up_at_the_end_offsets_with_every_twin(isolated: NettwinSettings) -> None:
    topic = Topics.from_settings(isolated).twin_models
    producer = make_producer(isolated)
    for c in range(40):
        twin = TwinMessage("cluster", str(c), 1, 4, np.zeros(8, np.float32), {"members": [c], "as_of": 3})
        producer.send(topic, twin.encode(), key=twin.key)
    producer.send(topic, b"not a twin", key=b"cluster:x")  # counted, not fatal
    producer.flush()
    producer.close()
    follower = TwinFollower(isolated)
    follower.start()
    try:
        assert follower.caught_up.wait(30)
        twins = TwinVersions()
        follower.drain_into(twins)
        # caught up means every message up to the end offsets is in the inbox, not "quiet for a while"
        assert len(twins.versions) == 40
        assert follower.counters["unreadable"] == 1
    finally:
        follower.stopping.set()
        follower.join(10)
    assert not follower.is_alive()


def test_a_follower_that_cannot_reach_kafka_retries_and_counts(services: NettwinSettings) -> None:
    unreachable = load_settings({"kafka": {"bootstrap_servers": "127.0.0.1:1"}})
    follower = TwinFollower(unreachable)
    follower.start()
    try:
        wait_until(lambda: follower.counters["errors"] >= 2, 20, "two failed attempts")
        assert follower.is_alive() and not follower.caught_up.is_set()
    finally:
        follower.stopping.set()
        follower.join(15)
    assert not follower.is_alive()


def test_an_unusable_site_is_a_dead_letter_not_a_crash() -> None:
    from stream_processors.followers import SiteFollower

    follower = SiteFollower(load_settings())  # not started: messages are put in its inbox by hand
    deep = ("[" * 100_000 + "]" * 100_000).encode()  # json.loads raises RecursionError
    follower.inbox.put((b"Lab", deep, "sites.ftm[0]@7"))
    follower.inbox.put((b"Lab", b'{"scene": 5}', "sites.ftm[0]@8"))
    sites: dict = {}
    letters = follower.drain_into(sites)
    assert [(d.position, d.source) for d in letters] == [
        ("sites.ftm[0]@7", follower.topic),
        ("sites.ftm[0]@8", follower.topic),
    ]
    assert letters[0].original == deep and "RecursionError" in letters[0].reason
    assert sites == {} and follower.counters["unreadable"] == 2
