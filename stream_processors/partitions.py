"""Per-partition agent state that stays right whatever partitions a worker is given. No Kafka here.

An agent keeps one state object per input ``(topic, partition)``. A state is only valid for the offsets it
has seen in order: it is dropped when the partition is revoked (another worker may process the next
messages), and when a message arrives that does not follow the last one (a rewind to the committed offset
after a rebalance gave the partition back). The agent then builds a fresh state for that message, and a
state built while a revocation happened is never installed (it may have missed messages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

S = TypeVar("S")
TopicPartition = tuple[str, int]


@dataclass
class _Slot(Generic[S]):
    state: S
    next_offset: int  # the offset the state expects next


class PartitionStates(Generic[S]):
    def __init__(self, aliases: dict[str, str] | None = None) -> None:
        self._slots: dict[TopicPartition, _Slot[S]] = {}
        # input topic -> the name states are kept under (a state fed by several co-partitioned topics)
        self.aliases = aliases or {}
        self.epoch = 0  # bumped by every revocation: states built across one are not installed

    def get(self, topic: str, partition: int, offset: int | None = None) -> S | None:
        """The state of (topic, partition) if it is valid for a message at ``offset``, else None.

        Without an offset (a state fed by several topics) only revocations invalidate it."""
        slot = self._slots.get((topic, partition))
        if slot is None:
            return None
        if (
            offset is not None and offset < slot.next_offset
        ):  # re-delivered from an earlier committed offset: start over
            del self._slots[(topic, partition)]
            return None
        return slot.state

    def put(self, topic: str, partition: int, state: S, next_offset: int, epoch: int | None = None) -> bool:
        """Install a state expecting ``next_offset``; refused if built before a revocation (``epoch``)."""
        if epoch is not None and epoch != self.epoch:
            return False
        self._slots[(topic, partition)] = _Slot(state, next_offset)
        return True

    def advance(self, topic: str, partition: int, offset: int) -> None:
        """The message at ``offset`` is folded into the state."""
        slot = self._slots.get((topic, partition))
        if slot is not None:
            slot.next_offset = max(slot.next_offset, offset + 1)

    def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        self.epoch += 1
        for topic, partition in partitions:
            self._slots.pop((self.aliases.get(topic, topic), partition), None)

    def keep_only(self, assigned: Iterable[TopicPartition]) -> None:
        """Drop the states of partitions no longer assigned (an assignment replaces the previous one)."""
        keep = {(self.aliases.get(topic, topic), partition) for topic, partition in assigned}
        gone = [tp for tp in self._slots if tp not in keep]
        if gone:
            self.revoke(gone)

    def states(self) -> list[S]:
        return [slot.state for slot in self._slots.values()]

    def items(self) -> Iterator[tuple[TopicPartition, S]]:
        for tp, slot in list(self._slots.items()):
            yield tp, slot.state

    def __len__(self) -> int:
        return len(self._slots)


def get_or_build(
    states: PartitionStates[S], topic: str, partition: int, offset: int | None, build: Callable[[], S]
) -> S:
    """The valid state for a message at ``offset``, building (and installing) a fresh one if needed."""
    state = states.get(topic, partition, offset)
    if state is None:
        state = build()
        states.put(topic, partition, state, offset or 0)
    return state
