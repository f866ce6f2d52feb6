"""WriteToDuckDB: the embedded-warehouse sink (the default on a laptop).

Thin DoFns over ``sinks.duckdb_store.DuckDBWarehouse``: they buffer a bundle and
write it in ``finish_bundle``. Rows the warehouse rejects (type conflicts under
``freeze``, values the column cannot hold) are written to the dead-letter table
in the same flush and counted, never dropped.
"""
from __future__ import annotations

from typing import Mapping

import apache_beam as beam
from apache_beam.metrics import Metrics

from flatten import live
from flatten.options import SchemaMode
from sinks import ledger
from sinks.duckdb_store import DuckDBWarehouse
from sinks.spec import TableSpec, WarehouseSpec

__all__ = ["WriteToDuckDB"]


class _BufferedWriteFn(beam.DoFn):
    """Buffers one bundle of one record kind, writes it at bundle end."""

    def __init__(self, kind: str, warehouse: WarehouseSpec, tables: Mapping[str, TableSpec],
                 modes: Mapping[str, SchemaMode]):
        self._kind = kind
        self._args = (warehouse, dict(tables), dict(modes))
        # mirrored into flatten.live for the status line of `headwater run` (same increments)
        self._written = live.mirror(Metrics.counter("headwater", f"warehouse_{kind}_written"), f"{kind}_written")
        self._rejected = live.mirror(Metrics.counter("headwater", "dead_letters_warehouse"), "dead_letters_written")

    def setup(self) -> None:
        self._wh = DuckDBWarehouse(*self._args)

    def start_bundle(self) -> None:
        self._buf: list = []

    def process(self, element):
        self._buf.append(element)
        if len(self._buf) >= 50_000:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()

    def _flush(self) -> None:
        buf, self._buf = self._buf, []
        if not buf:
            return
        if self._kind == "rows":
            rejected = self._wh.write_rows(buf)
            if rejected:
                self._rejected.inc(len(rejected))
                self._wh.write_dead_letters(rejected)
            self._written.inc(len(buf) - len(rejected))
            _durable_rows(buf)
        elif self._kind == "aggregates":
            self._written.inc(self._wh.write_aggregates(buf))
        else:
            self._written.inc(self._wh.write_dead_letters(buf))
            _durable_dead_letters(buf)


def _durable_rows(rows) -> None:
    """Committed: tell the local commit ledger (sinks.ledger; a no-op unless a local source registered)."""
    if ledger.active():
        ledger.rows_durable([r.row_id for r in rows])


def _durable_dead_letters(dls) -> None:
    if ledger.active():
        ledger.dead_letters_durable([d.coords for d in dls])


class WriteToDuckDB(beam.PTransform):
    """{"rows": PCollection[TableRow], "aggregates": PCollection[AggregateRow],
    "dead_letters": PCollection[DeadLetter]} -> the DuckDB file at ``warehouse.path``.

    Idempotent: rows by ``_row_id``, aggregates by (partner, aggregate, key, window,
    version), dead letters by a hash of their source and reason.
    """

    def __init__(self, warehouse: WarehouseSpec, tables: Mapping[str, TableSpec],
                 modes: Mapping[str, SchemaMode], label: str = "WriteToDuckDB"):
        super().__init__(label)
        self._args = (warehouse, tables, modes)

    def expand(self, pcolls):
        for kind, label in (("rows", "WriteRows"), ("aggregates", "WriteAggregates"),
                            ("dead_letters", "WriteDeadLetters")):
            _ = pcolls[kind] | label >> beam.ParDo(_BufferedWriteFn(kind, *self._args))
        return pcolls
