"""``headwater backfill run``: waves of chunks into staging, then one apply per mode, resumable by ``--id``.

    list chunks once (lazily, spooled to a temporary file: nothing held in memory)
    for each wave of ``wave_chunks`` chunks:   skip chunks the ledger has (same generation)
        Beam run (backfill.wave) -> staging;   ledger: chunk rows + the wave's counts
    apply staging -> live tables per mode (backfill.target_*), ledger: apply row
    aggregates pass (backfill.aggregates): keys with rows in [from, to) recomputed from the warehouse rows
    summary: records in = rows + dead letters + duplicates + out of range -> OK, else exit 1

SIGINT/SIGTERM stop between or inside a wave: what was staged stays in the ledger, the
command prints it and exits 130/143; rerunning the same ``--id`` resumes. A finished
backfill rerun with the same id changes nothing (the ledger says it was applied).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Iterator, Sequence, TextIO

import orjson

from backfill.chunks import Chunk, iter_chunks
from backfill.ledger import Counts, summary_line
from backfill.planner import make_target
from backfill.signals import Stopped, exit_code, stop_on_signals
from backfill.spec import BackfillSpec
from ingest import scratch
from ingest.contract import Contract, ContractError

__all__ = ["run_backfill", "Stopped", "summary_line"]


def _params(spec: BackfillSpec, target) -> dict:
    return {"partner": spec.partner, "patterns": list(spec.patterns), "format": spec.format, "mode": spec.mode,
            "columns": list(spec.columns), "from": spec.start_us, "to": spec.end_us, "staging": target.staging_name}


def _spool(patterns: Sequence[str]) -> tuple[str, int, int]:
    """List once into a temporary NDJSON file: (path, chunks, bytes)."""
    fd, path = scratch.new_file("backfill", ".jsonl")  # removed when the run ends, or by the next run if killed
    n = total = 0
    with os.fdopen(fd, "wb") as fh:
        for c in iter_chunks(patterns):
            fh.write(orjson.dumps(tuple(c)) + b"\n")
            n += 1
            total += c.size
    return path, n, total


def _waves(path: str, size: int) -> Iterator[list[Chunk]]:
    wave: list[Chunk] = []
    with open(path, "rb") as fh:
        for line in fh:
            wave.append(Chunk(*orjson.loads(line)))
            if len(wave) >= size:
                yield wave
                wave = []
    if wave:
        yield wave


class _Progress:
    """A rich live bar on a TTY (chunks and events done/total, events/s, ETA); silent otherwise."""

    def __init__(self, out: TextIO, chunks: int, total_bytes: int):
        self._enabled = out.isatty()
        self._chunks, self._bytes = chunks, total_bytes
        self._events_done = 0
        self._bytes_done = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        if not self._enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("chunks  {task.fields[events]}  {task.fields[rate]}"), TimeElapsedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=out), transient=False)
        self._task = self._bar.add_task("backfill", total=chunks, events="", rate="")
        self._bar.start()
        self._th = threading.Thread(target=self._tick, daemon=True)
        self._th.start()

    def _tick(self) -> None:
        from ingest import progress

        while not self._stop.wait(0.5):
            live = self._events_done + progress.parsed()
            per_byte = (self._events_done / self._bytes_done) if self._bytes_done else None
            total = f"~{int(per_byte * self._bytes):,}" if per_byte else "?"
            rate = live / max(time.monotonic() - self._t0, 1e-6)
            self._bar.update(self._task, events=f"events {live:,}/{total}", rate=f"{rate:,.0f} events/s")

    def wave_started(self) -> None:
        from ingest import progress

        progress.reset()

    def done(self, chunks: int, nbytes: int, events: int) -> None:
        from ingest import progress

        progress.reset()  # the wave's live count is now in _events_done
        self._events_done += events
        self._bytes_done += nbytes
        if self._enabled:
            self._bar.advance(self._task, chunks)

    def close(self) -> None:
        self._stop.set()
        if self._enabled:
            self._th.join()
            self._bar.stop()


def run_backfill(contract: Contract, spec: BackfillSpec, beam_argv: Sequence[str] = (), out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr, keep_staging: bool = False) -> int:
    """Run (or resume) the backfill ``spec.backfill_id``. Returns the exit code (0 OK, 1 not reconciled)."""
    from backfill.wave import run_wave

    if not spec.backfill_id:
        raise ContractError("--id: backfill run needs an id (it names the ledger entries and staging)")
    bid = spec.backfill_id
    partner = contract.partner(spec.partner)
    try:
        spec.check_partitions(partner.table.name, partner.table.partition_granularity)
    except ValueError as exc:
        raise ContractError(str(exc)) from None
    target = make_target(contract, bid)
    if hasattr(target, "ensure"):
        target.ensure()
    else:
        target.ledger.ensure()
    ledger = target.ledger
    params = _params(spec, target)
    prev = ledger.params(bid)
    if prev is not None and prev != params:
        diff = sorted(k for k in params if prev.get(k) != params.get(k))
        raise ContractError(f"--id: backfill {bid!r} was started with other arguments ({', '.join(diff)} differ); "
                            "use a new id, or the same arguments to resume")
    applied = ledger.applied(bid)
    if applied is not None:
        waves, total, nchunks = ledger.staged_totals(bid)
        out.write(f"backfill {bid}: already applied ({nchunks:,} chunks in {waves} waves); nothing to do\n")
        if not keep_staging:
            target.drop_staging()
        code = _summarize(out, partner.table.name, spec, total, applied, rerun=True)
        _aggregates(contract, partner, spec, out)  # writes nothing when the aggregates are already exact
        return code
    if prev is None:
        ledger.record_params(bid, params)
    elif ledger.staged_totals(bid)[2] and not target.staging_exists():
        raise ContractError(f"--id: backfill {bid!r} has staged chunks in the ledger but its staging "
                            f"{target.staging_name} is gone; start again with a new id")
    if not target.staging_exists():
        target.seed_staging(partner.name, partner.table)

    with stop_on_signals():
        spool = None
        bar = None
        skipped = ran = 0
        applying = False
        try:
            t0 = time.monotonic()
            spool, nchunks, nbytes = _spool(spec.patterns)
            if nchunks == 0:
                raise ContractError(f"--source: no chunk matches {list(spec.patterns)}")
            err.write(f"headwater: backfill {bid}: {nchunks:,} chunks, {nbytes:,} bytes, mode {spec.mode}, "
                      f"events {spec.describe_range()}, into {target.kind} (staging {target.staging_name})\n")
            bar = _Progress(err, nchunks, nbytes)
            wave_no = ledger.next_wave(bid)
            for wave in _waves(spool, spec.wave_chunks):
                done = ledger.done(bid, wave)
                seen: set[str] = set()
                todo = []
                for c in wave:
                    if c.uri not in done and c.uri not in seen:
                        todo.append(c)
                    seen.add(c.uri)
                skipped += len(wave) - len(todo)
                if not todo:
                    bar.done(len(wave), 0, 0)
                    continue
                bar.wave_started()
                started = int(time.time() * 1_000_000)
                counts = run_wave(contract, spec, todo, target.staging_warehouse, beam_argv)
                ledger.record_wave(bid, wave_no, todo, counts, started)
                if not counts.reconciled:
                    err.write(f"headwater: wave {wave_no} does not reconcile: {summary_line(counts)}\n")
                wave_no += 1
                ran += len(todo)
                bar.done(len(wave), sum(c.size for c in todo), counts.events_in)
            bar.close()
            bar = None
            err.write(f"headwater: {ran:,} chunks staged in {time.monotonic() - t0:.1f}s"
                      f"{f', {skipped:,} already staged (skipped)' if skipped else ''}; applying ({spec.mode})\n")
            applying = True
            result = target.apply(spec, partner.name, partner.table)
            _, total, _ = ledger.staged_totals(bid)
            code = _summarize(out, partner.table.name, spec, total, result)
            _aggregates(contract, partner, spec, out)
            if not keep_staging:
                target.drop_staging()
            return code
        except Stopped as stop:
            if bar is not None:
                bar.close()
                bar = None
            waves, total, staged = ledger.staged_totals(bid)
            state = ("the apply was interrupted (each statement is atomic and idempotent; DuckDB's apply rolled "
                     "back)" if applying else "nothing applied yet")
            out.write(f"backfill {bid}: stopped by {stop.name}: {staged:,} chunks staged in {waves} waves "
                      f"({total.events_in:,} records read), {state}. Rerun with --id {bid} to resume.\n")
            return exit_code(stop)
        finally:
            if bar is not None:
                bar.close()
            if spool:
                os.unlink(spool)


def _aggregates(contract: Contract, partner, spec: BackfillSpec, out: TextIO) -> None:
    """The aggregates pass (backfill.aggregates): one final row per (key, window) of the keys with rows in
    the backfill's range, recomputed from all of their warehouse rows; nothing for keys already exact."""
    from backfill.aggregates import run_aggregates_pass, touched_keys

    if not partner.aggregates:
        return
    keys = touched_keys(contract, partner.name, spec.start_us, spec.end_us)
    res = run_aggregates_pass(contract, partner.name, keys)
    out.write(f"  {res.line()}\n")


def _summarize(out: TextIO, main_table: str, spec: BackfillSpec, waves: Counts, result: dict,
               rerun: bool = False) -> int:
    """Final reconciliation: rows = distinct main rows staged; rows produced twice by different chunks
    (same _row_id) are duplicates too; main rows the warehouse rejected are dead letters."""
    tables = result.get("tables", {})
    staged_main = tables.get(main_table, {}).get("staged", 0)
    rejected = int(result.get("rejected_main_rows", 0))
    across = waves.rows - staged_main - rejected
    final = Counts(waves.events_in, staged_main, waves.dead_letters + rejected, waves.duplicates + max(across, 0),
                   waves.out_of_range)
    ok = final.reconciled and across >= 0
    out.write(f"\nBackfill {spec.backfill_id} ({spec.mode}, events {spec.describe_range()})"
              f"{' [from the ledger]' if rerun else ''}\n")
    for t, x in sorted(tables.items()):
        extra = f", columns set {x['columns_set']}" if x.get("columns_set") else ""
        out.write(f"  {t:<40} staged {x['staged']:>9,}  inserted {x['inserted']:>9,}  updated {x['updated']:>9,}  "
                  f"deleted {x['deleted']:>9,}  absent (not inserted) {x['absent']:>7,}{extra}\n")
    out.write(f"  dead letters added: {result.get('dead_letters_added', 0):,}\n")
    if across > 0:
        out.write(f"  {across:,} rows were in more than one chunk (same _row_id): counted as duplicates\n")
    out.write(f"\nReconciliation: {summary_line(final)}\n")
    if not ok:
        out.write("headwater: the backfill did not reconcile\n")
    return 0 if ok else 1
