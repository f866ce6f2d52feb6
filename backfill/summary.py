"""The reconciliation of a bounded run: records in = rows + dead letters + duplicates + out of range.

``CountOutcomes`` taps a built job's outputs with two counting steps (``CountMainRows``,
``CountDeadLetters``); :func:`counts_from` reads them, with the sources' and the dedup step's
own counters, from the finished job. Used by every bounded run: ``backfill run`` (per wave),
``run`` on a batch contract and ``replay``. Counters are Beam metrics, so the figures are the
same on the local runner and on Dataflow (committed values).

* records in: records the file sources read (``file_records``) + file-level dead letters
  (``dead_letters_file``: an unreadable chunk or an oversized line) + ``replay_records`` (replay);
* rows: main-table rows produced (one per event that got through);
* dead letters: event-level dead letters (not sink rejections, not aggregate-only ones);
* duplicates: ``duplicate_events`` (DropDuplicateEvents);
* out of range: ``backfill_out_of_range`` (backfill.read.KeepEventRange).
"""
from __future__ import annotations

import sys
from typing import Iterable, TextIO

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from backfill.ledger import Counts, summary_line

__all__ = ["CountOutcomes", "counts_from", "rows_include_duplicates", "summary_line", "run_bounded"]

MAIN_ROWS = "backfill_main_rows"
DEAD = "backfill_dead_letters"


class _CountMainRowsFn(beam.DoFn):
    def __init__(self, tables: Iterable[str]):
        self._tables = frozenset(tables)
        self._n = Metrics.counter("headwater", MAIN_ROWS)

    def process(self, row):
        if isinstance(row, list):  # the bounded job's DuckDB row stream carries batches (ingest.bounded.RowBatch)
            self._n.inc(sum(1 for r in row if r.table in self._tables))
        elif row.table in self._tables:
            self._n.inc()
        return iter(())


class _CountDeadLettersFn(beam.DoFn):
    """Event-level dead letters (sink rejections are reported by the warehouse, aggregate ones keep their rows)."""

    def __init__(self):
        self._n = Metrics.counter("headwater", DEAD)

    def process(self, dl):
        if dl.source not in ("warehouse", "aggregate"):
            self._n.inc()
        return iter(())


class CountOutcomes(beam.PTransform):
    """(rows: PCollection[TableRow | list[TableRow]], dead_letters: PCollection[DeadLetter]) -> counters only."""

    def __init__(self, main_tables: Iterable[str], label: str = "CountOutcomes"):
        super().__init__(label)
        self._tables = tuple(main_tables)

    def expand(self, pcolls):
        rows, dead = pcolls
        _ = rows | "CountMainRows" >> beam.ParDo(_CountMainRowsFn(self._tables))
        _ = dead | "CountDeadLetters" >> beam.ParDo(_CountDeadLettersFn())
        return beam.pvalue.PDone(rows.pipeline)


def rows_include_duplicates(contract) -> bool:
    """Whether the bounded job's row stream still carries duplicate events' rows: on DuckDB it does
    (``ingest.bounded``: rows are written as they come, the warehouse's per-event key absorbs the
    repeats), on BigQuery only the kept copy's rows are written (``keep_rows``)."""
    return not contract.streaming and contract.warehouse.kind == "duckdb"


def counts_from(result, rows_include_duplicates: bool = False) -> Counts:
    """The job's reconciliation figures. ``rows`` are events that became rows: main rows produced, minus
    the duplicates' own rows when the row stream carries them (a duplicate event yields the same main row
    id, so it adds nothing to the warehouse and is counted once, as a duplicate)."""
    n: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace("headwater"))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        n[c.key.metric.name] = n.get(c.key.metric.name, 0) + int(value or 0)
    dups = n.get("duplicate_events", 0)
    rows = n.get(MAIN_ROWS, 0) - (dups if rows_include_duplicates else 0)
    return Counts(events_in=n.get("file_records", 0) + n.get("dead_letters_file", 0) + n.get("replay_records", 0),
                  rows=rows, dead_letters=n.get(DEAD, 0), duplicates=dups,
                  out_of_range=n.get("backfill_out_of_range", 0))


def run_bounded(contract, beam_argv=(), out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``headwater run`` on a batch contract: the job, live progress on a TTY, then the reconciliation.

    Returns 0 when it reconciles, 1 when it does not or the job did not finish DONE.
    """
    import time

    from ingest.bounded import bounded_settings, defer_rows_writes
    from ingest.objectstore import configure_gcs_emulator
    from ingest.pipeline import _configure_local_state_cache, build, pipeline_options

    _configure_local_state_cache(beam_argv)
    configure_gcs_emulator()
    p = beam.Pipeline(options=pipeline_options(contract, beam_argv))
    outputs = build(p, contract)
    _ = (outputs.rows, outputs.dead_letters) | "CountOutcomes" >> CountOutcomes(p.table.name for p in contract.partners)
    from backfill.signals import Stopped, exit_code, stop_on_signals

    t0 = time.monotonic()
    try:
        # bounded_settings: what ingest.pipeline.run (the demo, the benchmark) runs a bounded job with
        with stop_on_signals(), LiveCount(err), bounded_settings(defer_writes=defer_rows_writes(contract)):
            result = p.run()
            state = str(result.wait_until_finish())
    except Stopped as stop:
        out.write(f"headwater: stopped by {stop.name} before the job finished; rows already written are "
                  "idempotent (deterministic row ids): rerun the same command to complete it\n")
        return exit_code(stop)
    c = counts_from(result, rows_include_duplicates(contract))
    out.write(f"headwater: job finished in state {state} in {time.monotonic() - t0:.1f}s\n")
    out.write(f"Reconciliation: {summary_line(c)}\n")
    return 0 if state.endswith("DONE") and c.reconciled else 1


class LiveCount:
    """A rich live line (records parsed, records/s) on a TTY while a bounded job runs in this process; else nothing."""

    def __init__(self, out: TextIO, what: str = "records parsed"):
        self._out = out
        self._what = what
        self._progress = None

    def __enter__(self):
        from ingest import progress

        progress.reset()
        if not self._out.isatty():
            return self
        import threading

        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.fields[n]} " + self._what + "  {task.fields[rate]}"),
                                  TimeElapsedColumn(), console=Console(file=self._out))
        task = self._progress.add_task("run", n="0", rate="")
        self._stop = threading.Event()
        import time

        t0 = time.monotonic()

        def tick():
            while not self._stop.wait(0.5):
                n = progress.parsed()
                self._progress.update(task, n=f"{n:,}", rate=f"{n / max(time.monotonic() - t0, 1e-6):,.0f}/s")

        self._th = threading.Thread(target=tick, daemon=True)
        self._progress.start()
        self._th.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._stop.set()
            self._th.join()
            self._progress.stop()
        return False
