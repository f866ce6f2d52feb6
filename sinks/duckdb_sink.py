"""WriteToDuckDB: the embedded-warehouse sink (the default on a laptop).

Thin DoFns over ``sinks.duckdb_store.DuckDBWarehouse``: they buffer a bundle and
write it in ``finish_bundle``. Rows the warehouse rejects (type conflicts under
``freeze``, values the column cannot hold) are written to the dead-letter table
in the same flush and counted, never dropped.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from flatten import live
from flatten.options import SchemaMode
from sinks import ledger
from sinks.duckdb_store import DuckDBWarehouse, release_held
from sinks.spec import TableSpec, WarehouseSpec

__all__ = ["WriteToDuckDB", "FLUSH_ROWS"]

#: Rows per write. Each write is one INSERT and one checkpoint of the DuckDB file (on close), whose
#: cost grows with the table: fewer, larger writes are cheaper overall (bench/README.md).
FLUSH_ROWS = 50_000


class _BufferedWriteFn(beam.DoFn):
    """Buffers one bundle of one record kind and writes it in the background: while DuckDB inserts and
    checkpoints one buffer (it releases the GIL), the stage goes on producing the next. At most one write
    is in flight; ``finish_bundle`` waits for it, so a bundle only completes once its rows are stored."""

    def __init__(self, kind: str, warehouse: WarehouseSpec, tables: Mapping[str, TableSpec],
                 modes: Mapping[str, SchemaMode], keep_open: bool = False):
        self._kind = kind
        self._args = (warehouse, dict(tables), dict(modes))
        self._keep_open = keep_open  # streaming: small bundles share a held write connection (duckdb_store)
        # mirrored into flatten.live for the status line of `headwater run` (same increments)
        self._written = live.mirror(Metrics.counter("headwater", f"warehouse_{kind}_written"), f"{kind}_written")
        self._rejected = live.mirror(Metrics.counter("headwater", "dead_letters_warehouse"), "dead_letters_written")

    def setup(self) -> None:
        self._wh = DuckDBWarehouse(*self._args, keep_open=self._keep_open)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"duckdb-{self._kind}")
        self._pending: Optional[Future] = None

    def start_bundle(self) -> None:
        self._buf: list = []

    def process(self, element):
        if isinstance(element, list):  # a batch of TableRows (the bounded job's rows)
            self._buf.extend(element)
        else:
            self._buf.append(element)
        if len(self._buf) >= FLUSH_ROWS:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()
        self._wait()

    def teardown(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        if self._keep_open:
            release_held(self._args[0].path)

    def _wait(self) -> None:
        """Wait for the write in flight (re-raising its error) and count it here: Beam metrics belong to the
        bundle's thread."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        written, rejected = pending.result()
        if rejected:
            self._rejected.inc(rejected)
        self._written.inc(written)
        live.inc(f"{self._kind}_writes")  # writes per kind: with *_written, the rows per write (bench/stream_bench.py)

    def _flush(self) -> None:
        buf, self._buf = self._buf, []
        if not buf:
            return
        self._wait()
        self._pending = self._pool.submit(self._write, buf)

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
            _ = pcolls[kind] | label >> beam.ParDo(
                _BufferedWriteFn(kind, *self._args, keep_open=keep_open)).with_output_types(bytes)
        return pcolls
