"""sinks.ledger: what a local source may commit, given what the warehouse has made durable."""
from __future__ import annotations

import pytest

from sinks import ledger


@pytest.fixture(autouse=True)
def _fresh():
    ledger.reset()
    yield
    ledger.reset()


def _kafka(offsets, partition=0):
    for o in offsets:
        ledger.register_kafka(f"kafka:t/{partition}@{o}", "g", "t", partition, o)


def test_kafka_commits_only_up_to_the_lowest_offset_still_in_flight():
    _kafka(range(10, 15))
    assert ledger.kafka_position("g", "t", 0) == 10
    ledger.expect_rows("kafka:t/0@11", ["r11a", "r11b"])
    ledger.expect_rows("kafka:t/0@10", ["r10"])
    ledger.rows_durable(["r11a"])  # half of offset 11's rows: nothing done yet
    assert ledger.kafka_position("g", "t", 0) == 10
    ledger.rows_durable(["r11b"])  # 11 done, 10 still pending: the commit may not pass 10
    assert ledger.kafka_position("g", "t", 0) == 10
    ledger.rows_durable(["r10"])
    assert ledger.kafka_position("g", "t", 0) == 12
    ledger.resolve("kafka:t/0@12")  # dropped as a duplicate
    ledger.dead_letters_durable(["kafka:t/0@13"])  # a malformed payload's dead letter was written
    assert ledger.kafka_position("g", "t", 0) == 14
    ledger.expect_rows("kafka:t/0@14", ["r14"])
    ledger.rows_durable(["r14"])
    assert ledger.kafka_position("g", "t", 0) == 15  # one past the last record read
    assert ledger.kafka_pending("g", "t", 0) == 0 and not ledger.active()


def test_partitions_are_independent():
    _kafka([0, 1], partition=0)
    _kafka([0], partition=1)
    ledger.resolve("kafka:t/1@0")
    assert ledger.kafka_position("g", "t", 1) == 1
    assert ledger.kafka_position("g", "t", 0) == 0


def test_pubsub_acks_a_redelivered_message_only_when_every_delivery_is_done():
    ledger.register_pubsub("pubsub:s#m1", "s", "ack-1")
    ledger.expect_rows("pubsub:s#m1", ["r1"])
    ledger.register_pubsub("pubsub:s#m1", "s", "ack-2")  # lease ran out: redelivered while in flight
    ledger.resolve("pubsub:s#m1")  # the redelivery is dropped as a duplicate of the first
    assert ledger.pubsub_take_done("s") == []  # acking now would lose m1 if the job died before its rows land
    assert ledger.pubsub_pending("s") == ["ack-2"]
    ledger.rows_durable(["r1"])
    assert sorted(ledger.pubsub_take_done("s")) == ["ack-1", "ack-2"]
    assert ledger.pubsub_pending("s") == []


def test_rows_shared_by_two_deliveries_and_unknown_coords():
    ledger.register_pubsub("pubsub:s#m1", "s", "a1")
    ledger.register_pubsub("pubsub:s#m1", "s", "a2")
    ledger.expect_rows("pubsub:s#m1", ["r1"])
    ledger.expect_rows("pubsub:s#m1", ["r1"])  # both passed dedup (its flag had expired): same row ids
    ledger.rows_durable(["r1"])
    assert sorted(ledger.pubsub_take_done("s")) == ["a1", "a2"]
    ledger.resolve("file:x.jsonl:1")  # nothing registered it: ignored
    ledger.expect_rows("file:x.jsonl:1", ["r9"])
    ledger.rows_durable(["r9"])
    assert ledger.pending_count() == 0


def test_an_event_with_no_rows_is_done_at_once():
    _kafka([5])
    ledger.expect_rows("kafka:t/0@5", [])
    assert ledger.kafka_position("g", "t", 0) == 6


def test_an_offset_delivered_again_after_it_was_done_does_not_hold_the_position():
    """Offset 11 is done while 10 is pending (so 11 is still in the heap), then delivered again (a
    re-read) and done again. A second heap copy of 11 would outlive its done mark and hold the
    commit position at 11 for good; the partition must commit past it."""
    _kafka([10, 11, 12])
    ledger.resolve("kafka:t/0@11")
    _kafka([11])  # delivered again after it was done
    assert ledger.kafka_position("g", "t", 0) == 10
    ledger.resolve("kafka:t/0@11")
    ledger.resolve("kafka:t/0@10")
    ledger.resolve("kafka:t/0@12")
    assert ledger.kafka_position("g", "t", 0) == 13
    assert ledger.kafka_pending("g", "t", 0) == 0 and not ledger.active()
    assert ledger.kafka_partitions("g") == [("t", 0)]


def test_an_offset_delivered_again_while_done_but_queued_is_pending_again():
    _kafka([10, 11])
    ledger.resolve("kafka:t/0@11")
    _kafka([11])  # the new delivery is in flight: the position may not pass 11 once 10 is done
    ledger.resolve("kafka:t/0@10")
    assert ledger.kafka_position("g", "t", 0) == 11
    ledger.resolve("kafka:t/0@11")
    assert ledger.kafka_position("g", "t", 0) == 12
