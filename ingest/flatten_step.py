"""FlattenEvents: Event -> warehouse TableRows (+ AggregateInputs), via the pure ``flatten`` package."""
from __future__ import annotations

import time
from typing import Any

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue

from flatten.core import FlattenError
from flatten.fast import FastFlattener
from flatten.records import AggregateInput, DeadLetter, Event, Reason, TableRow
from ingest.contract import Contract
from ingest.mask_key import contract_mask_key
from flatten.mask import Masker
from sinks import ledger

__all__ = ["FlattenEvents", "AGGREGATE_TAG", "DEAD_LETTER_TAG"]

AGGREGATE_TAG = "aggregate_inputs"
DEAD_LETTER_TAG = "dead_letter"


def _metric_columns(spec) -> tuple[str, ...]:
    cols = []
    for m in spec.metrics:
        if m.column and m.column not in cols:
            cols.append(m.column)
    return tuple(cols)


class _FlattenFn(beam.DoFn):
    def __init__(self, contract: Contract, step: str):
        self._contract = contract
        self._step = step
        self._rows = Metrics.counter("headwater", "rows_flattened")
        self._dead = Metrics.counter("headwater", "dead_letters_flatten")
        self._nokey = Metrics.counter("headwater", "aggregate_key_missing")
        self._py_events = Metrics.counter("headwater", "flatten_python_path_events")

    def setup(self) -> None:
        # Compile once per worker: one flattener per partner, plus the aggregate plans.
        self._plans: dict[str, Any] = {}
        m = self._contract.masking
        self._refs = Masker([], contract_mask_key(m))  # keyed payload refs
        for p in self._contract.partners:
            aggs = [(a.name, a.key, _metric_columns(a)) for a in p.aggregates]
            # native (native/) when built and supported, else the Python flattener; identical rows
            self._plans[p.name] = (FastFlattener(p.flatten), p.table.name, aggs)

    def process(self, event: Event):
        flattener, table, aggs = self._plans[event.partner]
        try:
            before = flattener.python_events
            rows = flattener.rows(event.doc, event.event_id, event.user_id, event.event_time_us)
            if flattener.python_events != before:
                self._py_events.inc()
        except (FlattenError, RecursionError, ValueError, TypeError) as exc:
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(
                partner=event.partner, source=event.source, coords=event.coords, payload=event.doc,
                payload_ref=self._refs.payload_ref(event.doc), error_class=type(exc).__name__,
                reason=Reason.FLATTEN_ERROR,
                message=(f"{exc.reason}: " if isinstance(exc, FlattenError) else "") + str(exc)[:1000], step=self._step,
                event_time_us=event.event_time_us, processing_time_us=int(time.time() * 1_000_000)))
            return
        if ledger.active():  # local runner: the source commits this message once these rows are durable
            ledger.expect_rows(event.coords, [r[1] for r in rows])
        for sub, row_id, cols, types in rows:  # columns/types are orjson bytes already
            self._rows.inc()
            yield TableRow(
                partner=event.partner, table=table if not sub else f"{table}__{sub}", row_id=row_id,
                event_id=event.event_id, event_time_us=event.event_time_us, row=cols, types=types)
        if aggs:
            main = orjson.loads(rows[0][2])
            ts = event.event_time_us / 1_000_000
            for name, key_col, cols in aggs:
                key = event.user_id if key_col == "user_id" else main.get(key_col)
                if key is None or isinstance(key, (list, dict)):
                    self._nokey.inc()
                    continue
                values = {c: main.get(c) for c in cols}
                yield beam.pvalue.TaggedOutput(AGGREGATE_TAG, TimestampedValue(AggregateInput(
                    partner=event.partner, aggregate=name, key=str(key), event_id=event.event_id,
                    event_time_us=event.event_time_us, values=orjson.dumps(values)), ts))


class FlattenEvents(beam.PTransform):
    """PCollection[Event] -> DoOutputsTuple(rows=PCollection[TableRow], aggregate_inputs=PCollection[AggregateInput],
    dead_letter=PCollection[DeadLetter]).

    Main rows land in the partner's table, array children in ``<table>__<path>``.
    Aggregate inputs carry the aggregate key and only the columns its metrics read.
    Element timestamps stay the event time.
    """

    def __init__(self, contract: Contract, label: str = "FlattenEvents"):
        super().__init__(label)
        self._contract = contract

    def expand(self, events):
        return events | "Flatten" >> beam.ParDo(_FlattenFn(self._contract, self.label)).with_output_types(
            TableRow, **{AGGREGATE_TAG: AggregateInput, DEAD_LETTER_TAG: DeadLetter}).with_outputs(
            AGGREGATE_TAG, DEAD_LETTER_TAG, main="rows")
