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

from flatten.options import SchemaMode
from sinks.duckdb_store import DuckDBWarehouse
from sinks.spec import TableSpec, WarehouseSpec

__all__ = ["WriteToDuckDB"]


class _BufferedWriteFn(beam.DoFn):
    """Buffers one bundle of one record kind, writes it at bundle end."""

    def __init__(self, kind: str, warehouse: WarehouseSpec, tables: Mapping[str, TableSpec],
                 modes: Mapping[str, SchemaMode]):
        self._kind = kind
        self._args = (warehouse, dict(tables), dict(modes))
        self._written = Metrics.counter("headwater", f"warehouse_{kind}_written")
        self._rejected = Metrics.counter("headwater", "dead_letters_warehouse")

    def setup(self) -> None:
        self._wh = DuckDBWarehouse(*self._args)

    def start_bundle(self) -> None:
        self._buf: list = []

    def process(self, element):
        if isinstance(element, list):  # a batch of TableRows (the bounded job's rows)
            self._buf.extend(element)
        else:
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
        elif self._kind == "aggregates":
            self._written.inc(self._wh.write_aggregates(buf))
        else:
            self._written.inc(self._wh.write_dead_letters(buf))


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
        for kind, label in (("rows", "WriteRows"), ("aggregates", "WriteAggregates"),
                            ("dead_letters", "WriteDeadLetters")):
            _ = pcolls[kind] | label >> beam.ParDo(_BufferedWriteFn(kind, *self._args))
        return pcolls
