"""Commit after durable, no timing guess: an in-process ledger of the source messages in flight.

On the local runner (Prism with ``--environment_type=LOOPBACK``) every SDK worker runs in the
launching process, so the sources, the dedup step, the flatten step and the warehouse sink share
this module. Each source *delivery* is followed until it is terminal:

* the source registers it before emitting it (Kafka: topic/partition/offset; Pub/Sub: ack id);
* ``DropDuplicateEvents`` resolves a delivery it drops (a duplicate is terminal: its original
  has its own entry, or is already in the warehouse);
* ``FlattenEvents`` says which warehouse row ids a delivery became (``expect_rows``);
* the warehouse sink reports row ids and dead-letter coords once the DuckDB statement holding
  them has committed (``rows_durable``, ``dead_letters_durable``).

A delivery with all its rows durable, a durable dead letter, or dropped as a duplicate is done;
a message is done when all its deliveries are (a Pub/Sub message redelivered while the first
delivery is still in flight stays pending until both are). The sources' commit loops then commit
per Kafka partition only up to the lowest offset still pending, and ack only done Pub/Sub
messages. Aggregate state needs no entry of its own: a restart rebuilds it from the durable rows
(``ingest.recovery``), so rows durable means state recoverable.

Nothing here blocks the pipeline: every call is a few dict operations under one lock, and a
coords string no source registered (files, Dataflow, other jobs) is ignored.
"""
from __future__ import annotations

import heapq
import threading
from typing import Iterable, Optional

__all__ = ["register_kafka", "register_pubsub", "expect_rows", "resolve", "rows_durable", "dead_letters_durable",
           "kafka_position", "kafka_pending", "kafka_partitions", "pubsub_take_done", "pubsub_give_back", "pubsub_pending", "pending_count", "reset",
           "active"]

_lock = threading.Lock()


class _Entry:
    __slots__ = ("kind", "channel", "offset", "ack_ids", "deliveries", "row_ids", "row_waits")

    def __init__(self, kind: str, channel: tuple, offset: Optional[int]):
        self.kind = kind
        self.channel = channel
        self.offset = offset
        self.ack_ids: list[str] = []
        self.deliveries = 0
        self.row_ids: set[str] = set()
        self.row_waits = 0


class _KafkaChannel:
    """One partition: a min-heap of registered offsets; those done are removed lazily.

    ``queued`` mirrors the heap's contents: an offset delivered again after it was done but before
    the heap dropped it (a lower offset still pending) must not be pushed twice, or the second copy
    would outlive its ``done`` mark and hold the commit position there for good."""

    __slots__ = ("heap", "queued", "done", "last")

    def __init__(self):
        self.heap: list[int] = []
        self.queued: set[int] = set()
        self.done: set[int] = set()
        self.last: Optional[int] = None

    def add(self, offset: int) -> None:
        if offset not in self.queued:
            self.queued.add(offset)
            heapq.heappush(self.heap, offset)
        self.done.discard(offset)

    def position(self) -> Optional[int]:
        while self.heap and self.heap[0] in self.done:
            off = heapq.heappop(self.heap)
            self.done.discard(off)
            self.queued.discard(off)
        if self.heap:
            return self.heap[0]
        return None if self.last is None else self.last + 1


_entries: dict[str, _Entry] = {}
_rows: dict[str, set[str]] = {}  # row id -> coords waiting for it
_kafka: dict[tuple, _KafkaChannel] = {}  # (group, topic, partition) -> channel
_acks: dict[str, list[str]] = {}  # subscription -> ack ids of done messages, not yet acked


def active() -> bool:
    """True while some delivery is registered (a cheap check for hooks on hot paths)."""
    return bool(_entries)


def register_kafka(coords: str, group: str, topic: str, partition: int, offset: int) -> None:
    channel = (group, topic, partition)
    with _lock:
        ch = _kafka.get(channel)
        if ch is None:
            ch = _kafka[channel] = _KafkaChannel()
        e = _entries.get(coords)
        if e is None:
            e = _entries[coords] = _Entry("kafka", channel, offset)
            ch.add(offset)
        e.deliveries += 1
        if ch.last is None or offset > ch.last:
            ch.last = offset


def register_pubsub(coords: str, subscription: str, ack_id: str) -> None:
    with _lock:
        e = _entries.get(coords)
        if e is None:
            e = _entries[coords] = _Entry("pubsub", (subscription,), None)
        e.deliveries += 1
        e.ack_ids.append(ack_id)


def _finish_one(coords: str, e: _Entry, n: int = 1) -> None:
    e.deliveries -= n
    if e.deliveries > 0:
        return
    del _entries[coords]
    for rid in e.row_ids:
        waiting = _rows.get(rid)
        if waiting is not None:
            waiting.discard(coords)
            if not waiting:
                del _rows[rid]
    if e.kind == "kafka":
        ch = _kafka.get(e.channel)
        if ch is not None:
            ch.done.add(e.offset)
    else:
        _acks.setdefault(e.channel[0], []).extend(e.ack_ids)


def resolve(coords: str) -> None:
    """One delivery of ``coords`` ended with nothing more to make durable (e.g. dropped as a duplicate)."""
    if coords not in _entries:
        return
    with _lock:
        e = _entries.get(coords)
        if e is not None:
            _finish_one(coords, e)


def expect_rows(coords: str, row_ids: Iterable[str]) -> None:
    """One delivery of ``coords`` became these warehouse rows; it is done once they are all durable."""
    if coords not in _entries:
        return
    with _lock:
        e = _entries.get(coords)
        if e is None:
            return
        ids = set(row_ids)
        if not ids:
            _finish_one(coords, e)
            return
        e.row_waits += 1
        e.row_ids |= ids
        for rid in ids:
            _rows.setdefault(rid, set()).add(coords)


def rows_durable(row_ids: Iterable[str]) -> None:
    """The warehouse committed these rows (or their dead letters)."""
    if not _rows:
        return
    with _lock:
        for rid in row_ids:
            waiting = _rows.pop(rid, None)
            if not waiting:
                continue
            for coords in waiting:
                e = _entries.get(coords)
                if e is None:
                    continue
                e.row_ids.discard(rid)
                if not e.row_ids and e.row_waits:
                    n, e.row_waits = e.row_waits, 0
                    _finish_one(coords, e, n)


def dead_letters_durable(coords: Iterable[str]) -> None:
    """The warehouse committed dead letters carrying these source coords: those deliveries are done."""
    if not _entries:
        return
    for c in coords:
        resolve(c)


# -- the commit side (source threads) ---------------------------------------------------------------
def kafka_position(group: str, topic: str, partition: int) -> Optional[int]:
    """The offset to commit: the lowest registered offset not yet done, else one past the last registered."""
    with _lock:
        ch = _kafka.get((group, topic, partition))
        return None if ch is None else ch.position()


def kafka_partitions(group: str) -> list[tuple[str, int]]:
    """Every (topic, partition) of ``group`` a source registered records of (what its committer commits)."""
    with _lock:
        return sorted((t, p) for g, t, p in _kafka if g == group)


def kafka_pending(group: str, topic: str, partition: int) -> int:
    with _lock:
        ch = _kafka.get((group, topic, partition))
        if ch is None:
            return 0
        ch.position()
        return len(ch.heap) - len(ch.done)


def pubsub_take_done(subscription: str) -> list[str]:
    """Ack ids of done messages (removed from the ledger: the caller acks them or gives them back)."""
    with _lock:
        return _acks.pop(subscription, [])


def pubsub_give_back(subscription: str, ack_ids: list[str]) -> None:
    with _lock:
        _acks.setdefault(subscription, []).extend(ack_ids)


def pubsub_pending(subscription: str) -> list[str]:
    """The latest ack id of every message of ``subscription`` still in flight (for lease extension)."""
    with _lock:
        return [e.ack_ids[-1] for e in _entries.values() if e.kind == "pubsub" and e.channel[0] == subscription]


def pending_count() -> int:
    with _lock:
        return len(_entries)


def reset() -> None:
    """Forget everything (a job ended; tests)."""
    with _lock:
        _entries.clear()
        _rows.clear()
        _kafka.clear()
        _acks.clear()
