"""BatchPerKey: GroupIntoBatches semantics with typed state (TestStream on the DirectRunner, streaming)."""
from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that
from apache_beam.typehints import typehints

from flatten.records import TableRow
from sinks.batches import BUFFER_LABEL, BatchPerKey
import state.coders  # noqa: F401  (Row coders)

START = 1_700_000_000


def _row(i: int, table: str = "t") -> TableRow:
    return TableRow("p", table, f"r{i}", f"e{i}", i, b"{}", b"{}")


class _Clock:
    def __call__(self) -> float:
        return START


def _run(stream, check, max_buffering_s=10.0, window=None):
    with beam.Pipeline(options=PipelineOptions(streaming=True, runner="DirectRunner")) as p:
        rows = p | "Rows" >> stream
        if window:
            rows = rows | "Window" >> beam.WindowInto(window)
        keyed = rows | "Key" >> beam.Map(lambda r: (r.table, r)).with_output_types(typehints.KV[str, TableRow])
        batches = keyed | "Batch" >> BatchPerKey(3, max_buffering_s, clock=_Clock())
        assert_that(batches | "Ids" >> beam.Map(lambda kv: (kv[0], sorted(r.row_id for r in kv[1]))), check)


def test_full_batches_then_the_buffering_limit_flushes_partial_ones():
    stream = (TestStream()
              .advance_processing_time(START).advance_watermark_to(0)
              .add_elements([_row(i) for i in range(4)] + [_row(9, "u")])  # t: one full batch + 1; u: 1
              .advance_processing_time(11)  # the buffering limit (10 s) passed: partial batches flush
              .advance_watermark_to(1_000))

    def check(batches):
        assert sorted(batches) == [("t", ["r0", "r1", "r2"]), ("t", ["r3"]), ("u", ["r9"])]

    _run(stream, check)


def test_end_of_window_flushes_without_a_buffering_limit():
    stream = (TestStream()
              .advance_processing_time(START).advance_watermark_to(0)
              .add_elements([beam.window.TimestampedValue(_row(i), 5) for i in range(5)])
              .add_elements([beam.window.TimestampedValue(_row(7), 65)])
              .advance_processing_time(3600)  # no buffering limit: nothing flushes on processing time
              .advance_watermark_to(61)  # the first minute's window ends: its partial batch flushes
              .advance_watermark_to(1_000))

    def check(batches):
        assert sorted(batches) == [("t", ["r0", "r1", "r2"]), ("t", ["r3", "r4"]), ("t", ["r7"])]

    _run(stream, check, max_buffering_s=0, window=beam.window.FixedWindows(60))


def test_state_is_typed_and_input_must_be():
    p = beam.Pipeline()
    keyed = (p | "Rows" >> beam.Create([_row(1)])
             | "Key" >> beam.Map(lambda r: (r.table, r)).with_output_types(typehints.KV[str, TableRow]))
    out = keyed | "Batch" >> BatchPerKey(2, 1.0)
    assert out.element_type == typehints.KV[str, typehints.Iterable[TableRow]]
    from deploy.graph import pickled_coders, snapshot

    snap = snapshot(p.to_runner_api())
    state = snap["transforms"][f"Batch/{BUFFER_LABEL}"]["state"]
    assert state["count"] == "combining_spec:varint"
    assert state["values"].startswith("bag_spec:kv<string_utf8, row{partner:STRING, table:STRING")
    assert not pickled_coders(snap)
    untyped = p | "Raw" >> beam.Create([("a", 1)])
    untyped.element_type = typehints.Any
    with pytest.raises(TypeError, match="typed KV"):
        _ = untyped | "BatchUntyped" >> BatchPerKey(2, 1.0)
