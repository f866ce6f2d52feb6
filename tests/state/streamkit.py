"""Helpers shared by the Beam tests of state/ (TestStream builders, row decoding)."""
from __future__ import annotations

import orjson
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from flatten.records import AggregateInput, AggregateRow

S = 1_000_000
MIN = 60 * S
H = 3600 * S
START = 1_700_000_040  # processing-time origin of the TestStreams (seconds); a multiple of every emit_every used, so cadence boundaries (aligned to emit_every) fall at START + k * emit_every
# Last watermark of a TestStream (seconds). The DirectRunner fires timers when the watermark jumps
# to +inf, but assert_that's GroupByKey has already closed the global window by then and drops
# their output; ending on a finite watermark lets every TTL/close timer's rows reach the checks.
END = 400 * 86400


class FixedClock:
    """Processing-time source for the DoFn in TestStream tests.

    The DirectRunner's TestStream clock starts where the test sets it, not at
    wall-clock time, so timers are computed from this fixed origin: the first
    ``emit_every`` timer lands exactly at START + emit_every.
    """

    def __init__(self, t: float = START):
        self.t = t

    def __call__(self) -> float:
        return self.t


def inp(key: str, t_us: int, i: int, partner: str = "p", aggregate: str = "activity", **values) -> beam.window.TimestampedValue:
    return beam.window.TimestampedValue(
        AggregateInput(partner, aggregate, key, f"e{i:06d}", t_us, orjson.dumps(values)), t_us / S)


def plain(row: AggregateRow) -> tuple:
    """(key, window, metrics dict, watermark_us, version, final) with metrics decoded."""
    return (row.key, row.window, orjson.loads(row.metrics), row.watermark_us, row.version, row.final)


def streaming_options() -> PipelineOptions:
    return PipelineOptions(streaming=True, runner="DirectRunner")


def latest(rows) -> dict:
    """(key, window) -> metrics of the highest version: what the README's current-value query returns."""
    best: dict = {}
    for k, w, m, wm, v, f in rows:
        if (k, w) not in best or v > best[(k, w)][0]:
            best[(k, w)] = (v, m, wm, f)
    return {kw: (m, wm, f) for kw, (v, m, wm, f) in best.items()}


def _stamp(x: AggregateInput) -> beam.window.TimestampedValue:
    return beam.window.TimestampedValue(x, x.event_time_us / S)


def bounded(p: beam.Pipeline, inputs: list) -> beam.PCollection:
    """A bounded PCollection[AggregateInput] with event-time timestamps (what a backfill reads)."""
    return (p | "Backfill" >> beam.Create([tv.value for tv in inputs])
            | "StampEventTime" >> beam.Map(_stamp).with_output_types(AggregateInput))


SINK: dict[str, list] = {}


class Collect(beam.DoFn):
    """Appends elements to SINK[name] (in-process runners only).

    Used instead of assert_that for rows emitted when the watermark jumps to +inf at the end of a
    bounded input: the local runners deliver those after assert_that's GroupByKey closed the global
    window, so assert_that never sees them (see docs/state.md, "End of input").
    """

    def __init__(self, name: str):
        self.name = name

    def process(self, element):
        SINK.setdefault(self.name, []).append(element)
