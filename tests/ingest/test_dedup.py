"""DropDuplicateEvents on TestStreams: redelivery of old, late and replayed events, and into the aggregates.

Elements are stamped the way a Pub/Sub source with ``timestamp_attribute`` stamps them: with the
*event* time, which for an old or replayed event is far behind the watermark. The 'seen' flag must
live ``window`` after the event *arrived* (processing time, ``clock``), whatever that timestamp is;
keyed on the event time (the previous rule) these flags expired at once and the redeliveries were
counted twice. Runs on the DirectRunner in streaming mode, like tests/state/test_transform_stream.py.
"""
from __future__ import annotations

import os
import pickle
import uuid

from typing import Any, Tuple

import apache_beam as beam
import orjson
import pytest
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp

from flatten.records import AggregateInput, Event
from ingest import live_batches
from ingest.dedup import DropDuplicateEvents, arrival_expiry, dedup_key
from ingest.recovery import SeenIds
from sinks import ledger
from state.spec import AggregateSpec, MetricSpec
from state.transform import AggregateOutputs, ComputeAggregates
from tests.state.streamkit import FixedClock, latest, plain, streaming_options

DAY = 86_400
NOW = 1_790_000_000  # the processing time the events arrive at (seconds)
WINDOW = DAY


def ev(i: int, t_s: float, user: str = "u1", partner: str = "p", offset=None) -> beam.window.TimestampedValue:
    e = Event(partner=partner, event_id=f"e{i}", user_id=user, event_time_us=int(t_s * 1_000_000),
              coords=f"kafka:t/0@{i if offset is None else offset}", source="kafka", doc=b"{}")
    return beam.window.TimestampedValue(e, t_s)  # stamped with the event time (timestamp_attribute)


@pytest.fixture(params=[None, "mirrored", "batched", "batched-replayed"])
def local(request, monkeypatch):
    """None: the flag is read per event; else a job token: ids this process never flagged skip the read
    (state.mirror.KeySketch; the DirectRunner's state is in-process). "batched": the local streaming runner's
    batched steps (ingest.live_batches: dedup and aggregates per shard); "batched-replayed": the same with
    nothing kept in memory between bundles, so every bundle reads its shard from the Beam state log."""
    if request.param is None:
        return None
    if request.param == "batched-replayed":
        monkeypatch.setattr(live_batches, "hold", lambda *a: None)
    return (request.param.startswith("batched"), uuid.uuid4().hex)


class _Dedup(beam.PTransform):
    """The dedup step under test: the per-key DropDuplicateEvents, or the batched one (BatchEvents ->
    DropDuplicateEvents per shard -> one element per event again)."""

    def __init__(self, window_s, clock, local, seed=None):
        super().__init__()
        self._args = (window_s, clock, local, seed)

    def expand(self, events):
        window_s, clock, local, seed = self._args
        if not local or not local[0]:
            return events | DropDuplicateEvents(window_s=window_s, seed=seed, clock=clock,
                                                local_state=local[1] if local else None)
        return (events | "Batch" >> beam.ParDo(live_batches._BatchFn()).with_output_types(Tuple[int, Any])
                | "DedupShards" >> beam.ParDo(live_batches._DedupShardFn(window_s, local[1], "Dedup", seed, clock))
                | "Unbatch" >> beam.FlatMap(_each).with_output_types(Event))


def _each(batch):
    return batch


class _BatchInputsFn(beam.DoFn):
    """AggregateInputs -> one (shard, [inputs]) per aggregate shard per bundle (what the batched FlattenEvents
    sends to the aggregate shards)."""

    def start_bundle(self):
        self._buf = {}

    def process(self, inp, ts=beam.DoFn.TimestampParam):
        s = live_batches._shard(f"{inp.partner}\x1f{inp.aggregate}\x1f{inp.key}")
        buf = self._buf.setdefault(s, [[], ts])
        buf[0].append(inp)
        buf[1] = min(buf[1], ts)

    def finish_bundle(self):
        for s, (inputs, ts) in self._buf.items():
            yield WindowedValue((s, inputs), ts, (GlobalWindow(),))


def _aggregate(specs, clock, local):
    if not local or not local[0]:
        return ComputeAggregates(specs, clock=clock, local_state=local[1] if local else None)

    class _Batched(beam.PTransform):
        def expand(self, inputs):
            outs = (inputs | "BatchInputs" >> beam.ParDo(_BatchInputsFn()).with_output_types(Tuple[int, Any])
                    | "AggregateShards" >> beam.ParDo(live_batches._AggregateShardFn(
                        specs, "Aggregate", clock, local[1])).with_outputs("dead_letter", main="aggregates"))
            return AggregateOutputs(aggregates=outs["aggregates"], dead_letter=outs["dead_letter"])
    return _Batched()


def _ids(pcoll):
    return pcoll | "Ids" >> beam.Map(lambda e: e.event_id)


def test_arrival_expiry_is_from_arrival_not_from_an_old_event_time():
    old = Timestamp.of(NOW - 30 * DAY)
    assert arrival_expiry(old, NOW, WINDOW) == Timestamp.of(NOW + WINDOW)
    future = Timestamp.of(NOW + 10)  # a source time ahead of this clock still counts from itself
    assert arrival_expiry(future, NOW, WINDOW) == Timestamp.of(NOW + 10 + WINDOW)


def test_old_events_redelivered_after_the_watermark_moved_on_are_dropped(local):
    stream = (TestStream()
              .advance_watermark_to(NOW - 10)
              .add_elements([ev(1, NOW - 30 * DAY), ev(2, NOW - 3 * DAY)])  # a replay of old history
              .advance_watermark_to(NOW - 5)  # far past both event times + 1 day
              .add_elements([ev(1, NOW - 30 * DAY), ev(2, NOW - 3 * DAY)])  # redelivered
              .advance_watermark_to(NOW + WINDOW - 60)  # still inside the window since arrival
              .add_elements([ev(2, NOW - 3 * DAY), ev(3, NOW - 2 * DAY)])
              .advance_watermark_to_infinity())
    with beam.Pipeline(options=streaming_options()) as p:
        out = p | "Events" >> stream | "Dedup" >> _Dedup(WINDOW, FixedClock(NOW), local)
        assert_that(_ids(out), equal_to(["e1", "e2", "e3"]))


def test_late_and_replayed_events_pass_once_and_the_flag_expires_a_window_after_arrival(local):
    stream = (TestStream()
              .advance_watermark_to(NOW)
              .add_elements([ev(1, NOW - 1)])
              .add_elements([ev(1, NOW - 1), ev(1, NOW - 1)])  # at-least-once redeliveries
              .advance_watermark_to(NOW + 3600)
              .add_elements([ev(1, NOW - 1), ev(4, NOW - 7200)])  # late: behind the watermark
              .advance_watermark_to(NOW + WINDOW + 1)  # the window since arrival has passed: flags expire
              .add_elements([ev(1, NOW - 1)])  # a replay after the window is a new arrival (documented bound)
              .advance_watermark_to_infinity())
    with beam.Pipeline(options=streaming_options()) as p:
        out = p | "Events" >> stream | "Dedup" >> _Dedup(WINDOW, FixedClock(NOW), local)
        assert_that(_ids(out), equal_to(["e1", "e4", "e1"]))


SPEC = AggregateSpec(name="activity", metrics=[MetricSpec(name="n", fn="count")], windows=("lifetime",),
                     emit_every="60s", allowed_lateness="400d", ttl="800d")


def _to_input(e: Event) -> beam.window.TimestampedValue:
    return beam.window.TimestampedValue(
        AggregateInput(e.partner, "activity", e.user_id, e.event_id, e.event_time_us, orjson.dumps({})),
        e.event_time_us / 1_000_000)


def test_redeliveries_of_old_late_and_replayed_events_are_counted_once_in_the_aggregates(local):
    history = [ev(i, NOW - (40 - i) * DAY, user=f"u{i % 3}") for i in range(30)]  # a backfill-like replay
    stream = (TestStream()
              .advance_processing_time(NOW)
              .advance_watermark_to(NOW - 50 * DAY)
              .add_elements(history[:20])
              .advance_watermark_to(NOW - 5)
              .add_elements(history[:25])  # the first 20 again (a restart replaying uncommitted input) + 5 new
              .advance_processing_time(120)
              .add_elements(history)  # everything once more, late by weeks
              .advance_processing_time(120)
              .advance_watermark_to(NOW + 3600))
    with beam.Pipeline(options=streaming_options()) as p:
        events = p | "Events" >> stream | "Dedup" >> _Dedup(WINDOW, FixedClock(NOW), local)
        out = (events | "ToInputs" >> beam.Map(_to_input)
               | "Aggregate" >> _aggregate({("p", "activity"): SPEC}, FixedClock(NOW), local))
        rows = out.aggregates | "Plain" >> beam.Map(plain)

        def check(rows):
            got = {k: m["n"] for (k, w), (m, _wm, _f) in latest(list(rows)).items()}
            assert got == {"u0": 10, "u1": 10, "u2": 10}, got

        assert_that(rows, check)


def test_ids_already_in_the_warehouse_count_as_seen_once_and_their_drops_resolve_the_ledger(tmp_path, local):
    path = os.path.join(tmp_path, "seen.pickle")
    with open(path, "wb") as fh:
        pickle.dump({dedup_key("p", "e1"), dedup_key("p", "e2")}, fh)
    seed = SeenIds(path, WINDOW, 2)
    stream = (TestStream()
              .advance_watermark_to(NOW)
              .add_elements([ev(1, NOW - 5), ev(2, NOW - 4), ev(3, NOW - 3)])  # 1, 2 replayed after a restart
              .add_elements([ev(3, NOW - 3, offset=4)])  # the same event published twice
              .advance_watermark_to_infinity())
    ledger.reset()
    for i in (1, 2, 3, 4):
        ledger.register_kafka(f"kafka:t/0@{i}", "g", "t", 0, i)
    try:
        with beam.Pipeline(options=streaming_options()) as p:
            out = p | "Events" >> stream | "Dedup" >> _Dedup(WINDOW, FixedClock(NOW), local, seed=seed)
            assert_that(_ids(out), equal_to(["e3"]))
        # e1, e2 (seeded) and e3's second copy (offset 4) were dropped: terminal. e3 at offset 3 still
        # waits for its rows, so the partition commits up to offset 3, not past it
        assert ledger.kafka_position("g", "t", 0) == 3
    finally:
        ledger.reset()
