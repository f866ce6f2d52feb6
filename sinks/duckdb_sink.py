"""WriteToDuckDB: the embedded-warehouse sink (the default on a laptop).

Thin DoFns over ``sinks.duckdb_store.DuckDBWarehouse``: they buffer a bundle and
write it in ``finish_bundle``. Rows the warehouse rejects (type conflicts under
``freeze``, values the column cannot hold) are written to the dead-letter table
in the same flush and counted, never dropped.
"""
from __future__ import annotations

import collections
import contextlib
import os
import pickle
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from flatten import live
from flatten.options import SchemaMode
from flatten.records import TableRow
from sinks import ledger
from sinks.duckdb_store import DuckDBWarehouse, prepare_rows, release_held, schema_epoch
from sinks.spec import TableSpec, WarehouseSpec

__all__ = ["WriteToDuckDB", "FLUSH_ROWS", "deferred_writes"]

#: Rows per write. Each write is one INSERT and one checkpoint of the DuckDB file (on close), whose
#: cost grows with the table: fewer, larger writes are cheaper overall (bench/README.md).
FLUSH_ROWS = 50_000
#: A bounded job's writer keeps its write connection between flushes for at most this long (then closes it,
#: which checkpoints, and reconnects): the checkpoint on close cost 15-25 CPU-us per row written, growing
#: with the table, when every 50,000-row flush paid it (bench/README.md). Capped so that another process
#: writing the same file (e.g. a second local worker) still gets in well within its connect timeout.
HOLD_S = 10.0
#: ... and longer when closing takes long: a checkpoint rewrites what the table and its PRIMARY KEY index hold,
#: ~1.2 CPU-s per million rows already in the file at every close (`bench/duckdb_index_probe.py
#: --reconnect-every`: 0.9 s at 1M rows, 4.7 s at 4M), so with a fixed hold a 20M-row table spent most of the
#: writer's time checkpointing (bench/README.md, "Third pass"). The hold is at least HOLD_CLOSE_RATIO times the
#: last close's wall time (checkpoints stay under ~1/HOLD_CLOSE_RATIO of the writer's time), up to HOLD_MAX_S,
#: below the 120 s another writer waits for the file's lock.
HOLD_CLOSE_RATIO = 10.0
HOLD_MAX_S = 100.0
#: Rows per write while the connection is held (a bounded run without aggregates: its bundle waits for its
#: writes, two in flight): no checkpoint per write. Fewer, larger writes mean fewer statements and commits, each
#: of which hands the interpreter's lock back and forth: 1M events without aggregates 18.9-19.6 s at 40,000
#: against 20.6-21.6 at 20,000 and 21.2-21.6 at 10,000, +90 MB peak RSS; 80,000 gained ~0.5 s for +190 MB more
#: (bench/README.md, "Ninth pass").
HELD_FLUSH_ROWS = 40_000
#: ... and per write of a deferred rows writer (a bounded run with aggregates, ``deferred_writes``): its writes
#: are off the run's critical path (the fold runs meanwhile) and its queue is held in memory; 40,000 gave
#: -3 % CPU within noise, +1.3 s wall clock and +30 MB at 1M (three pairs), 1,286 MB at 10M (bench/README.md,
#: "Ninth pass"): not taken.
DEFERRED_FLUSH_ROWS = 10_000
#: Writes a bounded rows writer keeps queued or in flight before its bundle waits for the oldest: one write
#: in flight left the writer idle while the bundle filled the next buffer and the bundle waiting while a write
#: that checkpointed took long (bench/README.md, "Ninth pass"). The bundle still ends only once all are stored.
HELD_IN_FLIGHT = 2
#: DuckDB checkpoints a file at the commit that takes its write-ahead log past ``checkpoint_threshold`` (16 MB
#: by default: every few 10,000-row writes, ~45 % of the writer's samples at 1M events were commits). The held
#: bounded writer raises it to this; the log's rows wait in memory until the checkpoint, so this trades memory
#: for CPU: 1M events, 20,000 users: 65-73 CPU-s against 71-90 (two alternating rounds, noisy), +25-45 MB peak
#: RSS; 256 MB gained nothing more and cost +325 MB (bench/README.md, "Fourth pass").
CHECKPOINT_THRESHOLD = "64MB"
#: A bounded rows write's grouping and Arrow columns are built by the bundle's thread
#: (``duckdb_store.prepare_rows``), not by the writer thread (bench/README.md, "Ninth pass").
PREPARE_IN_BUNDLE = True
#: Deferred writes (``deferred_writes``: a bounded run in this process): the rows writer's queued buffers
#: are held in memory up to this many bytes of row data; the buffers queued beyond it wait in a spill file.
DEFER_MEMORY_BYTES = 96 << 20
#: A queued TableRow's memory besides its row JSON (the tuple, its ids, its types bytes), bytes: the estimate
#: the budget above counts with.
_ROW_OVERHEAD = 450


class _Deferral:
    """The writes a bounded run in this process has queued and not yet waited for (``deferred_writes``)."""

    def __init__(self):
        self.writers: list = []  # the deferring _BufferedWriteFn instances set up during the run
        self.errors: list = []  # failed writes found after their bundle (teardown, drain): raised by drain
        self.late = [0, 0]  # rows written / rejected by writes that completed after their writer's last bundle
        self.spilled = 0  # buffers that waited in a spill file
        self._root: Optional[str] = None
        self._n = 0
        self._lock = threading.Lock()

    def spill(self, buf: list) -> str:
        """Write a buffer of TableRows to a file of its own (column lists, pickled); returns its path."""
        with self._lock:
            if self._root is None:
                # the bounded job's spill naming (ingest.bounded.spill_dir): a killed run's directory is
                # removed by the next run; this run's when it ends (drain) or at exit
                self._root = tempfile.mkdtemp(prefix=f"headwater-spill-{os.getpid()}-")
            self._n += 1
            self.spilled += 1
            path = os.path.join(self._root, f"rows-{self._n}.pickle")
        with open(path, "wb") as fh:
            fh.write(pickle.dumps(list(zip(*buf)), protocol=pickle.HIGHEST_PROTOCOL))
        return path

    @staticmethod
    def unspill(path: str) -> list:
        with open(path, "rb") as fh:
            cols = pickle.loads(fh.read())
        os.unlink(path)
        return [tuple.__new__(TableRow, t) for t in zip(*cols)]

    def close(self) -> None:
        if self._root is not None:
            import shutil

            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


_DEFERRAL: Optional[_Deferral] = None


@contextlib.contextmanager
def deferred_writes() -> Iterator[_Deferral]:
    """Run a bounded job in this process with its rows writes deferred: the DuckDB rows writer's bundles
    end without waiting for their writes, which go on beside the job's next stages (the aggregate fold:
    FoldShards runs on one core while the writer, the bounded job's slowest part, works on the other).
    Leaving waits for every queued write, closes the writers' connections and raises the first write that
    failed (the FnApiRunner only logs what a DoFn's teardown raises). Queued buffers stay in memory up to
    ``DEFER_MEMORY_BYTES``, the rest wait in spill files. Outside this context (and for aggregates and dead
    letters) a bundle completes only once its rows are stored, as before."""
    global _DEFERRAL
    if _DEFERRAL is not None:  # nested (a run inside a run's context): the outer one drains
        yield _DEFERRAL
        return
    d = _DEFERRAL = _Deferral()
    try:
        yield d
    except BaseException:
        _finish(d, abandon=True)  # the run's own error (a failed write re-raised in a bundle, a stop) goes on
        raise
    _finish(d)
    if d.errors:
        first = d.errors[0]
        raise RuntimeError(f"{len(d.errors)} deferred DuckDB write(s) failed after the job's bundles "
                           f"completed; the first: {type(first).__name__}: {first}") from first


def _finish(d: _Deferral, abandon: bool = False) -> None:
    """Wait for what the run's writers still have queued, close them, remove the spill files."""
    global _DEFERRAL
    _DEFERRAL = None
    try:
        for w in list(d.writers):
            w._drain(d, abandon)
    finally:
        d.close()


class _HeldWarehouse(DuckDBWarehouse):
    """A ``DuckDBWarehouse`` whose write connection stays open from one write to the next within a bundle
    (``release`` closes it: the sink calls it in ``finish_bundle``) and for at most ``hold_for()``. Every
    statement still commits on its own; the file's in-process lock is held per write, as before, so the
    other writers of this process (which share the open database) go on writing in between."""

    def __init__(self, *args, hold_s: float = HOLD_S):
        super().__init__(*args)
        self._hold_s = hold_s
        self._con = None
        self._opened = 0.0
        self._last_close_s = 0.0  # wall time of the last close (its checkpoint)
        # table -> schema, valid while this connection is open and no writer of this process changed a schema
        # in the file (``schema_epoch``): no other process can change it meanwhile (the open connection holds
        # DuckDB's file lock). Saves a statement per table per write (the writer thread then waits for the GIL
        # after each statement: 5-10 % of its time at 1M events, bench/README.md "Fifth pass").
        self._schemas: dict = {}
        self._schemas_epoch = -1

    def hold_for(self) -> float:
        """How long the connection is kept from its opening: ``hold_s``, longer when closing is slow."""
        return max(self._hold_s, min(HOLD_CLOSE_RATIO * self._last_close_s, HOLD_MAX_S))

    def _with_conn(self, fn):
        with self._lock:
            if self._con is not None and time.monotonic() - self._opened >= self.hold_for():
                self._close()
            if self._con is None:
                self._con, self._opened = self._open_writer(), time.monotonic()
                self._con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            try:
                return fn(self._con)
            except BaseException:
                self._close()  # as the plain warehouse: a failed write leaves no connection behind
                raise

    def _schema_cache(self, con):
        if con is not self._con:
            return None
        epoch = schema_epoch(self.path)
        if epoch != self._schemas_epoch:  # a writer of this process changed a schema in the file
            self._schemas, self._schemas_epoch = {}, epoch
        return self._schemas

    def _remember_schema(self, con, table: str, schema) -> None:
        super()._remember_schema(con, table, schema)  # moves the epoch: the other writers' caches of this file drop
        if con is self._con:
            self._schemas_epoch = schema_epoch(self.path)  # ... not this writer's own

    def _close(self) -> None:
        self._schemas = {}
        con, self._con = self._con, None
        if con is not None:
            t0 = time.monotonic()
            con.close()  # DuckDB checkpoints on close
            self._last_close_s = time.monotonic() - t0

    def release(self) -> None:
        with self._lock:
            self._close()


class _BufferedWriteFn(beam.DoFn):
    """Buffers one bundle of one record kind and writes it in the background: while DuckDB inserts and
    checkpoints one buffer (it releases the GIL), the stage goes on producing the next. At most one write
    is in flight (two queued or in flight for the bounded held writer: ``HELD_IN_FLIGHT``); ``finish_bundle``
    waits for them, so a bundle only completes once its rows are stored."""

    def __init__(self, kind: str, warehouse: WarehouseSpec, tables: Mapping[str, TableSpec],
                 modes: Mapping[str, SchemaMode], hold: bool = False, keep_open: bool = False):
        self._kind = kind
        self._args = (warehouse, dict(tables), dict(modes))
        self._hold = hold  # a bounded input: keep the write connection within a bundle (_HeldWarehouse)
        self._keep_open = keep_open  # streaming: small bundles share a held write connection (duckdb_store)
        # mirrored into flatten.live for the status line of `headwater run` (same increments)
        self._written = live.mirror(Metrics.counter("headwater", f"warehouse_{kind}_written"), f"{kind}_written")
        self._rejected = live.mirror(Metrics.counter("headwater", "dead_letters_warehouse"), "dead_letters_written")

    def setup(self) -> None:
        self._wh = (_HeldWarehouse(*self._args) if self._hold
                    else DuckDBWarehouse(*self._args, keep_open=self._keep_open))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"duckdb-{self._kind}")
        self._pending: collections.deque = collections.deque()  # the writes in flight (Futures), oldest first
        self._closing: Optional[Future] = None
        self._mains = {partner: spec.name for partner, spec in self._args[1].items()}  # partner -> main table
        # a bounded run in this process (deferred_writes): rows writes queue and the bundle does not wait
        self._defer = _DEFERRAL if (self._hold and self._kind == "rows") else None
        self._flush_rows = (FLUSH_ROWS if not self._hold else
                            DEFERRED_FLUSH_ROWS if self._defer is not None else HELD_FLUSH_ROWS)
        self._in_flight = HELD_IN_FLIGHT if self._hold else 1
        self._queue: collections.deque = collections.deque()  # the deferred writes, oldest first
        self._queued = 0  # bytes of row data the queued in-memory buffers hold
        self._qlock = threading.Lock()
        if self._defer is not None:
            self._defer.writers.append(self)

    def start_bundle(self) -> None:
        self._buf: list = []

    def process(self, element):
        if isinstance(element, list):  # a batch of TableRows (the bounded job's rows): whole events
            self._buf.extend(element)
        elif self._kind == "rows":
            # An event's rows arrive one after the other, its main row first (flatten.core), and are written
            # in one write (duckdb_store: the event is the unit of idempotency): flush before a main row only.
            if len(self._buf) >= self._flush_rows and element.table == self._mains.get(element.partner):
                self._flush()
            self._buf.append(element)
            return
        else:
            self._buf.append(element)
        if len(self._buf) >= self._flush_rows:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()
        if self._defer is not None:
            self._collect()  # what has completed is counted in this bundle; the rest goes on (drain)
            return
        try:
            self._wait()
        finally:
            if self._hold:
                # The rows are committed (DuckDB's write-ahead log); closing the held connection checkpoints,
                # which the writer thread does while the job goes on (the next write, teardown wait for it).
                self._closing = self._pool.submit(self._wh.release)

    def teardown(self) -> None:
        if getattr(self, "_defer", None) is not None:
            return  # deferred_writes drains it when the run ends (the FnApiRunner only logs a teardown's error)
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        if self._keep_open:
            release_held(self._args[0].path)
        if self._hold and getattr(self, "_wh", None) is not None:
            self._wh.release()
            closing, self._closing = self._closing, None
            if closing is not None:
                closing.result()  # re-raises a failed checkpoint

    def _wait(self, keep: int = 0) -> None:
        """Wait for the writes in flight, oldest first, until ``keep`` remain (re-raising a write's error), and
        count them here: Beam metrics belong to the bundle's thread."""
        pending = self._pending
        while len(pending) > keep:
            written, rejected = pending[0].result()
            pending.popleft()
            self._count(written, rejected)

    def _flush(self) -> None:
        buf, self._buf = self._buf, []
        if not buf:
            return
        if self._defer is not None:
            self._enqueue(buf)
            return
        if PREPARE_IN_BUNDLE and self._hold and self._kind == "rows":  # bounded; the live sink's path unchanged
            buf = prepare_rows(buf)  # here, while the write in flight goes on (duckdb_store.PreparedRows)
        self._wait(keep=self._in_flight - 1)
        self._pending.append(self._pool.submit(self._write, buf))

    # ---- deferred writes (a bounded run in this process: deferred_writes)

    def _enqueue(self, buf: list) -> None:
        self._collect()  # re-raises a failed write in this bundle: the job fails now, not at its end
        # not prepared here (prepare_rows): a run with aggregates is not bound by this writer, and the Arrow
        # copy would cost memory (measured: the same CPU and wall clock, +40-90 MB; bench/README.md "Ninth pass")
        size = sum(len(r.row) for r in buf) + _ROW_OVERHEAD * len(buf)
        with self._qlock:
            spill = self._queue and self._queued + size > DEFER_MEMORY_BYTES
            if not spill:
                self._queued += size
        item = self._defer.spill(buf) if spill else buf
        self._queue.append(self._pool.submit(self._write_queued, item, 0 if spill else size))

    def _write_queued(self, item, size: int) -> "tuple[int, int]":
        try:
            return self._write(_Deferral.unspill(item) if isinstance(item, str) else item)
        finally:
            with self._qlock:
                self._queued -= size

    def _collect(self) -> None:
        """Count the deferred writes that have completed, oldest first (Beam metrics: in this bundle)."""
        q = self._queue
        while q and q[0].done():
            written, rejected = q.popleft().result()
            self._count(written, rejected)

    def _count(self, written: int, rejected: int) -> None:
        """Count a completed write (``_wait`` and the deferred writes alike)."""
        if rejected:
            self._rejected.inc(rejected)
        self._written.inc(written)
        live.inc(f"{self._kind}_writes")  # writes per kind: with *_written, the rows per write (bench/stream_bench.py)

    def _drain(self, d: _Deferral, abandon: bool = False) -> None:
        """At the end of the run: wait for every queued write (``abandon``: the run failed or was stopped,
        only for the one in progress; rows are idempotent, a rerun writes the rest), keep their failures
        for ``deferred_writes`` to raise, close the held connection."""
        d.writers.remove(self)
        q, self._queue = self._queue, collections.deque()
        if abandon:
            for fut in q:
                fut.cancel()
        while q:
            fut = q.popleft()
            if fut.cancelled():
                continue
            try:
                written, rejected = fut.result()
            except Exception as e:  # noqa: BLE001 - kept, raised by deferred_writes at the run's end
                d.errors.append(e)
                for rest in q:
                    rest.cancel()  # not started yet: a run with a failed write stops writing
                break
            d.late[0] += written
            d.late[1] += rejected
            self._count(written, rejected)  # outside a bundle only the live counters see it
        self._pool.shutdown(wait=True)
        try:
            self._wh.release()
        except Exception as e:  # noqa: BLE001
            d.errors.append(e)

    def _write(self, buf: list) -> "tuple[int, int]":
        if self._kind == "rows":
            rejected = self._wh.write_rows(buf)
            if rejected:
                self._wh.write_dead_letters(rejected)
            _durable_rows(buf)
            return len(buf) - len(rejected), len(rejected)
        if self._kind == "aggregates":
            return self._wh.write_aggregates(buf), 0
        written = self._wh.write_dead_letters(buf)
        _durable_dead_letters(buf)
        return written, 0


def _durable_rows(rows) -> None:
    """Committed: tell the local commit ledger (sinks.ledger; a no-op unless a local source registered)."""
    if ledger.active():
        ledger.rows_durable([r.row_id for r in rows])


def _durable_dead_letters(dls) -> None:
    if ledger.active():
        ledger.dead_letters_durable([d.coords for d in dls])


class WriteToDuckDB(beam.PTransform):
    """{"rows": PCollection[TableRow] (or of lists of TableRow), "aggregates": PCollection[AggregateRow],
    "dead_letters": PCollection[DeadLetter]} -> the DuckDB file at ``warehouse.path``.

    Idempotent: rows by ``_row_id``, aggregates by (partner, aggregate, key, window,
    version), dead letters by a hash of their source and reason.
    """

    def __init__(self, warehouse: WarehouseSpec, tables: Mapping[str, TableSpec],
                 modes: Mapping[str, SchemaMode], label: str = "WriteToDuckDB"):
        super().__init__(label)
        self._args = (warehouse, tables, modes)

    def expand(self, pcolls):
        keep_open = not pcolls["rows"].is_bounded  # a live job: many small bundles (duckdb_store, held connections)
        for kind, label in (("rows", "WriteRows"), ("aggregates", "WriteAggregates"),
                            ("dead_letters", "WriteDeadLetters")):
            # Emits nothing; the declared type keeps the graph free of pickled coders (tests/deploy/test_typed_graph.py).
            _ = pcolls[kind] | label >> beam.ParDo(_BufferedWriteFn(
                kind, *self._args, hold=pcolls[kind].is_bounded, keep_open=keep_open)).with_output_types(bytes)
        return pcolls
