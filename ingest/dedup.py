"""DropDuplicateEvents: effectively-once on top of at-least-once sources, keyed by (partner, event id)."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from flatten.records import Event
from ingest import progress

__all__ = ["DropDuplicateEvents"]


class _DedupFn(beam.DoFn):
    """Keeps a 'seen' flag per (partner, event id) until ``window_s`` past the element's timestamp.

    Runs before events are re-stamped with their event time, so the timestamp is the source's
    (Kafka record time, Pub/Sub publish time): the flag lives ``window_s`` of watermark time after
    arrival. Keyed on event time instead, replayed history (event times far behind the watermark)
    would expire at once and duplicates would pass.

    Redeliveries (Pub/Sub at-least-once, Kafka replays after a restart, duplicate
    lines in backfill files) carry the same event id and event time, so they hit
    the flag and are counted, not emitted. The cleanup timer bounds state.
    """

    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, window_s: float):
        self._window_s = window_s
        self._dups = Metrics.counter("headwater", "duplicate_events")

    def process(self, kv, ts=beam.DoFn.TimestampParam, seen=beam.DoFn.StateParam(SEEN),
                expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, event = kv
        if seen.read():
            self._dups.inc()
            progress.count_duplicate()
            return
        seen.write(True)
        expiry.set(Timestamp.of(ts) + Duration.of(self._window_s))
        yield event

    @on_timer(EXPIRY)
    def _expire(self, seen=beam.DoFn.StateParam(SEEN)):
        seen.clear()


def _key(event: Event) -> tuple[str, Event]:
    return f"{event.partner}\x1f{event.event_id}", event


def _stamp_event_time(event: Event) -> TimestampedValue:
    return TimestampedValue(event, event.event_time_us / 1_000_000)


class DropDuplicateEvents(beam.PTransform):
    """PCollection[Event] -> PCollection[Event] without repeated (partner, event_id).

    Input elements carry their source timestamps; outputs are stamped with the event time
    (``Event.event_time_us``), which every later step works in. ``window_s`` bounds how long an
    id is remembered after it arrived, in watermark time (default 1 day).
    """

    def __init__(self, window_s: float = 86_400.0, label: str = "DropDuplicateEvents"):
        super().__init__(label)
        self._window_s = window_s

    def expand(self, events):
        return (
            events
            | "KeyByEventId" >> beam.Map(_key).with_output_types(tuple[str, Event])
            | "Dedup" >> beam.ParDo(_DedupFn(self._window_s)).with_output_types(Event)
            | "StampEventTime" >> beam.Map(_stamp_event_time).with_output_types(Event)
        )
