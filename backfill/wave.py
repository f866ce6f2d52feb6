"""One wave of a backfill: a bounded Beam run of the unified pipeline over a few chunks, into staging.

    ReadChunks (override of Read_<partner>_file_0) -> the stream's own steps (ParseEnvelope,
    DropDuplicateEvents, FlattenEvents) -> WriteWarehouse into the *staging* warehouse
    file dead letters + pipeline dead letters -> AllBackfillDeadLetters -> staging dead letters
    rows, dead letters -> CountOutcomes   (counters for the reconciliation, backfill.summary)

The partner's aggregates are left out of waves: a key's events span waves, and per-wave
state would emit partial values (docs/backfill.md, "Aggregates").
Returns the wave's :class:`~backfill.ledger.Counts` from the job's committed counters.
"""
from __future__ import annotations

from typing import Sequence

import apache_beam as beam

from backfill.chunks import Chunk
from backfill.ledger import Counts
from backfill.read import ReadChunks
from backfill.spec import BackfillSpec
from backfill.summary import CountOutcomes, counts_from
from ingest.contract import Contract, FileSource

__all__ = ["wave_contract", "run_wave", "WaveFailed"]

_PLACEHOLDER = "headwater-backfill-wave"


class WaveFailed(RuntimeError):
    """The wave's Beam job did not finish DONE."""


def wave_contract(contract: Contract, spec: BackfillSpec, staging_warehouse) -> Contract:
    """Only the backfilled partner, one file source (overridden by ReadChunks), no aggregates, writing to staging."""
    partner = contract.partner(spec.partner)
    p = partner.model_copy(update={"sources": (FileSource(kind="file", pattern=_PLACEHOLDER, format=spec.format),),
                                   "aggregates": ()})
    return contract.model_copy(update={"partners": (p,), "warehouse": staging_warehouse})


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
    _ = (out.rows, dead) | "CountOutcomes" >> CountOutcomes([partner.table.name])
    _ = HeadwaterOutputs(out.rows, out.aggregates, dead) | "WriteWarehouse" >> WriteWarehouse(wc)
    result = p.run()  # the local FnApiRunner runs here, in this process; Dataflow returns at once
    try:
        state = str(result.wait_until_finish())
    except BaseException:  # SIGINT/SIGTERM (backfill.runner.Stopped) while a remote job runs: cancel it
        from apache_beam.runners.runner import PipelineState

        if not PipelineState.is_terminal(result.state):
            result.cancel()
        raise
    if not state.endswith("DONE"):
        raise WaveFailed(f"wave over {len(chunks)} chunks ended in state {state}")
    return counts_from(result)
