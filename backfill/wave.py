"""One wave of a backfill: a bounded Beam run of the unified pipeline over a few chunks, into staging.

    ReadChunks (override of Read_<partner>_file_0) -> the stream's own steps (ParseEnvelope,
    DropDuplicateEvents, FlattenEvents) -> WriteWarehouse into the *staging* warehouse
    file dead letters + pipeline dead letters -> AllBackfillDeadLetters -> staging dead letters
    rows -> CountMainRows; dead letters -> CountDeadLetters   (counters for the reconciliation)

The partner's aggregates are left out of waves: a key's events span waves, and per-wave
state would emit partial values (docs/backfill.md, "Aggregates").
Returns the wave's :class:`~backfill.ledger.Counts` from the job's committed counters.
"""
from __future__ import annotations

from typing import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from backfill.chunks import Chunk
from backfill.ledger import Counts
from backfill.read import OUT_OF_RANGE_COUNTER, ReadChunks
from backfill.spec import BackfillSpec
from ingest.contract import Contract, FileSource

__all__ = ["wave_contract", "run_wave", "WaveFailed"]

_MAIN_ROWS = "backfill_main_rows"
_DEAD = "backfill_dead_letters"
_PLACEHOLDER = "headwater-backfill-wave"


class WaveFailed(RuntimeError):
    """The wave's Beam job did not finish DONE."""


def wave_contract(contract: Contract, spec: BackfillSpec, staging_warehouse) -> Contract:
    """Only the backfilled partner, one file source (overridden by ReadChunks), no aggregates, writing to staging."""
    partner = contract.partner(spec.partner)
    p = partner.model_copy(update={"sources": (FileSource(kind="file", pattern=_PLACEHOLDER, format=spec.format),),
                                   "aggregates": ()})
    return contract.model_copy(update={"partners": (p,), "warehouse": staging_warehouse})


class _CountMainRowsFn(beam.DoFn):
    def __init__(self, table: str):
        self._table = table
        self._n = Metrics.counter("headwater", _MAIN_ROWS)

    def process(self, row):
        if row.table == self._table:
            self._n.inc()
        return iter(())


class _CountDeadLettersFn(beam.DoFn):
    """Event-level dead letters (sink rejections are counted at apply time, from the warehouse)."""

    def __init__(self):
        self._n = Metrics.counter("headwater", _DEAD)

    def process(self, dl):
        if dl.source not in ("warehouse", "aggregate"):
            self._n.inc()
        return iter(())


def _counters(result) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace("headwater"))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def run_wave(contract: Contract, spec: BackfillSpec, chunks: Sequence[Chunk], staging_warehouse,
             beam_argv: Sequence[str] = ()) -> Counts:
    """Run the pipeline over ``chunks`` into ``staging_warehouse``; returns the wave's counts."""
    from ingest.objectstore import configure_gcs_emulator
    from ingest.pipeline import HeadwaterOutputs, HeadwaterPipeline, WriteWarehouse, _configure_local_state_cache, \
        pipeline_options

    wc = wave_contract(contract, spec, staging_warehouse)
    partner = wc.partners[0]
    label = f"Read_{partner.name}_file_0"
    reader = ReadChunks([(c.uri, c.size, c.mtime_s) for c in chunks], partner.name, partner.envelope, spec.format,
                        spec.start_us, spec.end_us, step=label)
    _configure_local_state_cache(beam_argv)
    configure_gcs_emulator()
    p = beam.Pipeline(options=pipeline_options(wc, beam_argv))
    out = p | "Headwater" >> HeadwaterPipeline(wc, source_overrides={label: reader}, require_overrides=True)
    dead = (out.dead_letters, reader.dead_letters) | "AllBackfillDeadLetters" >> beam.Flatten()
    _ = out.rows | "CountMainRows" >> beam.ParDo(_CountMainRowsFn(partner.table.name))
    _ = dead | "CountDeadLetters" >> beam.ParDo(_CountDeadLettersFn())
    _ = HeadwaterOutputs(out.rows, out.aggregates, dead) | "WriteWarehouse" >> WriteWarehouse(wc)
    result = p.run()
    state = str(result.wait_until_finish())
    if not state.endswith("DONE"):
        raise WaveFailed(f"wave over {len(chunks)} chunks ended in state {state}")
    n = _counters(result)
    return Counts(events_in=n.get("file_records", 0) + n.get("dead_letters_file", 0),
                  rows=n.get(_MAIN_ROWS, 0), dead_letters=n.get(_DEAD, 0),
                  duplicates=n.get("duplicate_events", 0), out_of_range=n.get(OUT_OF_RANGE_COUNTER, 0))
