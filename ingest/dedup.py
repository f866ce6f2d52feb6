"""DropDuplicateEvents: effectively-once on top of at-least-once sources, keyed by (partner, event id)."""
from __future__ import annotations

import time
from typing import Callable, Optional

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from flatten.records import Event
from ingest import progress
from sinks import ledger
from state.mirror import sketch_for, write_new

__all__ = ["DropDuplicateEvents", "arrival_expiry", "dedup_key", "drop_duplicate"]


def arrival_expiry(element_ts: Timestamp, now_s: float, window_s: float) -> Timestamp:
    """When a 'seen' flag may go: ``window_s`` after the event *arrived*, in watermark time.

    Arrival is the later of the element's timestamp and the processing time: sources stamp
    elements with their own time (Kafka record time, Pub/Sub publish time) or, with a Pub/Sub
    ``timestamp_attribute``, the event time, which for an old or replayed event is far behind
    the watermark. Keyed on it, the flag would expire at once and the redelivery would pass.
    The watermark never runs ahead of the wall clock for live sources, so the flag lives at
    least ``window_s`` of real time after arrival. Pure.
    """
    arrival = max(Timestamp.of(element_ts), Timestamp.of(now_s))
    return arrival + Duration.of(window_s)


class _DedupFn(beam.DoFn):
    """Keeps a 'seen' flag per (partner, event id) until ``window_s`` after the event arrived.

    Redeliveries (Pub/Sub at-least-once, Kafka replays after a restart, duplicate
    lines in backfill files) carry the same event id, so they hit the flag and are
    counted, not emitted. The cleanup timer bounds state (see :func:`arrival_expiry`).

    ``seed`` (``ingest.recovery.SeenIds``, a local restart): ids the warehouse already holds
    count as seen on their first touch, so messages replayed after the last committed offset /
    ack are dropped instead of being counted twice in the aggregates rebuilt from the warehouse.

    A dropped duplicate is terminal for its source delivery: the local commit ledger
    (``sinks.ledger``) is told, so its offset can be committed / its message acked.
    """

    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, window_s: float, seed=None, clock: Callable[[], float] = time.time,
                 local_state: Optional[str] = None):
        self._window_s = window_s
        self._seed = seed
        self._clock = clock
        self._dups = Metrics.counter("headwater", "duplicate_events")
        # A job token when the runner's state lives in this process (Prism, LOOPBACK): ids this process
        # never flagged skip the state read (state.mirror.KeySketch). None: every id is read.
        self._local_state = local_state

    def setup(self):
        if self._seed is not None:
            self._seed.load()
        self._sketch = sketch_for(self._local_state, "DropDuplicateEvents") if self._local_state else None

    def process(self, kv, ts=beam.DoFn.TimestampParam, seen=beam.DoFn.StateParam(SEEN),
                expiry=beam.DoFn.TimerParam(EXPIRY)):
        key, event = kv
        sketch = self._sketch
        if sketch is None:
            if seen.read():
                self._drop(event)
                return
            seen.write(True)
        elif sketch.may_contain(key):
            if seen.read():
                self._drop(event)
                return
            seen.write(True)
        else:  # never flagged by this job: no state to read, none to clear
            write_new(seen, True)
            sketch.add(key)
        expiry.set(arrival_expiry(ts, self._clock(), self._window_s))
        if self._seed is not None and self._seed.take(key):
            self._drop(event)
            return
        yield event

    def _drop(self, event: Event) -> None:
        drop_duplicate(self._dups, event)

    @on_timer(EXPIRY)
    def _expire(self, seen=beam.DoFn.StateParam(SEEN)):
        seen.clear()


def drop_duplicate(counter, event: Event) -> None:
    """A duplicate dropped: counted (``counter``, the status line) and terminal for its source delivery (the
    local commit ledger may commit its offset / ack it)."""
    counter.inc()
    progress.count_duplicate()
    if ledger.active():
        ledger.resolve(event.coords)


def dedup_key(partner: str, event_id: str) -> str:
    return f"{partner}\x1f{event_id}"


def _key(event: Event) -> tuple[str, Event]:
    return dedup_key(event.partner, event.event_id), event


def _stamp_event_time(event: Event) -> TimestampedValue:
    return TimestampedValue(event, event.event_time_us / 1_000_000)


class DropDuplicateEvents(beam.PTransform):
    """PCollection[Event] -> PCollection[Event] without repeated (partner, event_id).

    Input elements carry their source timestamps; outputs are stamped with the event time
    (``Event.event_time_us``), which every later step works in. ``window_s`` bounds how long an
    id is remembered after it arrived (default 1 day; :func:`arrival_expiry`). ``seed``: ids
    already in the warehouse (``ingest.recovery``). ``clock``: processing time in seconds (tests).
    """

    def __init__(self, window_s: float = 86_400.0, label: str = "DropDuplicateEvents", seed=None,
                 clock: Optional[Callable[[], float]] = None, local_state: Optional[str] = None):
        super().__init__(label)
        self._window_s = window_s
        self._seed = seed
        self._clock = clock or time.time
        self._local_state = local_state  # see _DedupFn: a job token, only when the runner's state is in-process

    def expand(self, events):
        return (
            events
            | "KeyByEventId" >> beam.Map(_key).with_output_types(tuple[str, Event])
            | "Dedup" >> beam.ParDo(_DedupFn(self._window_s, self._seed, self._clock,
                                             self._local_state)).with_output_types(Event)
            | "StampEventTime" >> beam.Map(_stamp_event_time).with_output_types(Event)
        )
