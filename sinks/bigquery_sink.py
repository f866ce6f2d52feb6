"""WriteToBigQueryWarehouse: rows, aggregates and dead letters into BigQuery.

One code path for Dataflow and local tests: thin DoFns over
``sinks.bq_client.BigQueryTables`` (google-cloud-bigquery). The only thing a
local run changes is ``WarehouseSpec.endpoint`` (bqemulator). Why not Beam's
``WriteToBigQuery`` is in docs/bigquery.md (in short: it cannot carry our
deterministic row ids as insertAll ids, cannot add columns before a streaming
write, and has no endpoint option).

Graph (labels are a contract, see STYLE.md rule 1)::

    rows         -> KeyRowsByTable -> BatchRows -> WriteRows ----------+-> rejected rows
    aggregates   -> KeyAggregates  -> BatchAggregates -> WriteAggregates -+
    dead_letters + rejected -> AllSinkDeadLetters -> KeyDeadLetters -> BatchDeadLetters -> WriteDeadLetters

Per table batch: get-or-create the table (time partitioning + clustering),
reconcile the rows' columns with the live schema (``flatten.schema.reconcile``),
add the new NULLABLE/REPEATED columns to the table, *then* write: insertAll with
row ids = ``TableRow.row_id`` for unbounded input, load jobs (deterministic job
ids) for bounded input. Rows BigQuery rejects and freeze-mode conflicts become
``DeadLetter`` records (reason ``sink_rejected`` / ``too_large`` /
``type_conflict``) written to the dead-letter table. Transient errors are
retried with backoff up to ``warehouse.bigquery.max_attempts``.

Windowing: any; batches are per window and per table shard. Unbounded input is batched with
``sinks.batches.BatchPerKey`` (GroupIntoBatches' semantics with typed state; flushes after
``max_buffering_s``); bounded input with a GroupByKey on
(table, shard) (``_SHARDS`` shards by row id), each group written in chunks of
``load_batch_rows`` / ``insert_batch_rows``. (GroupIntoBatches on bounded input under the local
FnApiRunner sometimes never flushed its end-of-window timer: measured 3 lost runs in 10.)
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics
from apache_beam.transforms.display import DisplayDataItem

from flatten import live
from flatten.options import SchemaMode
from flatten.records import AggregateRow, DeadLetter, Reason, TableRow
from sinks import bq_rows, ledger
from sinks.batches import BatchPerKey
from sinks.spec import TableSpec, WarehouseSpec

__all__ = ["WriteToBigQueryWarehouse"]

_REJECTED = "rejected"
# str keys: a deterministic coder for the batching state; typed values: Row coders (never pickle) for the
# batching ``values`` bag state and the shuffle.
_KEYED_ROWS = beam.typehints.KV[str, TableRow]
_KEYED_AGGREGATES = beam.typehints.KV[str, AggregateRow]
_KEYED_DEAD_LETTERS = beam.typehints.KV[str, DeadLetter]


def _method(warehouse: WarehouseSpec, bounded: bool) -> str:
    m = warehouse.bigquery.method
    if m != "auto":
        return m
    return "file_loads" if bounded else "streaming_inserts"


class _WriteBatchFn(beam.DoFn):
    """(table key, [records]) -> writes them; rejected ones -> TaggedOutput('rejected', DeadLetter).

    ``kind`` is ``rows`` (TableRow), ``aggregates`` (AggregateRow) or ``dead_letters`` (DeadLetter).
    """

    def __init__(self, kind: str, warehouse: WarehouseSpec, tables: Mapping[str, TableSpec],
                 modes: Mapping[str, SchemaMode], method: str):
        self._kind = kind
        self._wh = warehouse
        self._tables = dict(tables)
        self._modes = dict(modes)
        self._method = method
        # mirrored into flatten.live for the status line of `headwater run` (same increments)
        self._written = live.mirror(Metrics.counter("headwater", f"bigquery_{kind}_written"), f"{kind}_written")
        self._rejected = live.mirror(Metrics.counter("headwater", "dead_letters_bigquery"), "dead_letters_written")
        self._retries = Metrics.counter("headwater", "bigquery_transient_retries")
        self._schema_updates = Metrics.counter("headwater", "bigquery_schema_updates")

    def display_data(self) -> dict:
        wh = self._wh
        if self._kind == "rows":
            layouts = [bq_rows.layout_for_row_table(s.name, p, s) for p, s in sorted(self._tables.items())]
        elif self._kind == "aggregates":
            layouts = [bq_rows.aggregates_layout(wh)]
        else:
            layouts = [bq_rows.dead_letters_layout(wh)]
        tables = ",".join(f"{wh.project}:{wh.dataset}.{lay.table}" for lay in layouts)
        parts = ",".join(f"{lay.table}={lay.partition_type}({lay.partition_field})" for lay in layouts)
        clus = ";".join(f"{lay.table}=" + ",".join(lay.clustering) for lay in layouts)
        params = {lay.table: lay.resource_extras(lay.base) | {"clustering": {"fields": list(lay.clustering)}}
                  for lay in layouts}
        return {
            "table_parameters": DisplayDataItem(orjson.dumps(params, option=orjson.OPT_SORT_KEYS).decode(),
                                                label="tables.insert timePartitioning/clustering per table"),
            "bigquery_tables": DisplayDataItem(tables, label="BigQuery tables (children: <table>__<child>)"),
            "bigquery_method": DisplayDataItem(self._method, label="BigQuery write method"),
            "time_partitioning": DisplayDataItem(parts, label="Time partitioning (type(field))"),
            "clustering": DisplayDataItem(clus, label="Clustering fields (child tables: _event_id)"),
            "schema_update": DisplayDataItem("ALLOW_FIELD_ADDITION", label="Schema update before writes"),
            "endpoint": DisplayDataItem(wh.endpoint or "https://bigquery.googleapis.com", label="BigQuery endpoint"),
        }

    def setup(self) -> None:
        from sinks.bq_client import BigQueryTables  # google-cloud-bigquery client: built once per worker

        self._bq = BigQueryTables(self._wh)

    def process(self, element):
        _, group = element
        size = self._wh.bigquery.insert_batch_rows if self._method == "streaming_inserts" \
            else self._wh.bigquery.load_batch_rows
        for batch in _chunked(group, size):  # a bounded group can be large: never materialise it whole
            yield from self._batch(batch)

    def _batch(self, batch: list):
        before = self._bq.retries
        if self._kind == "rows":
            yield from self._rows(batch)
        elif self._kind == "aggregates":
            yield from self._fixed(bq_rows.aggregates_layout(self._wh),
                                   [(bq_rows.aggregate_record(a), a) for a in batch])
        else:
            yield from self._dead_letters(batch)
        self._retries.inc(self._bq.retries - before)

    def _rows(self, batch):
        table = batch[0].table
        partner = batch[0].partner
        layout = bq_rows.layout_for_row_table(table, partner, self._tables[partner])
        live = self._bq.schema_of(layout) or layout.base
        prep = bq_rows.prepare_rows(live, batch, self._modes.get(partner, SchemaMode.EVOLVE))
        if prep.schema is not live or live is layout.base:
            self._bq.provide(layout, prep.schema)  # create / add columns before any row needs them
            self._schema_updates.inc()
        rejections = self._bq.write(layout, prep.schema, prep.records, self._method) if prep.records else []
        for d in prep.dead:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(_REJECTED, d)
        for rej in rejections:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(_REJECTED, bq_rows.rejected(
                prep.sources[rej.key], Reason.TOO_LARGE if rej.too_large else Reason.SINK_REJECTED,
                rej.error_class, rej.message))
        self._written.inc(len(prep.records) - len(rejections))
        if ledger.active():  # local runner: these rows' source messages may be committed (sinks.ledger)
            ledger.rows_durable([r.row_id for r in batch])

    def _fixed(self, layout, pairs):
        schema = self._bq.provide(layout, layout.base)
        records = [rec for rec, _ in pairs]
        rejections = self._bq.write(layout, schema, records, self._method)
        by_id = {rid: a for (rid, _), a in pairs}
        for rej in rejections:
            a = by_id[rej.key]
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(_REJECTED, DeadLetter(
                partner=a.partner, source="warehouse", coords=f"bigquery:{layout.table}/{rej.key}",
                payload=a.metrics, payload_ref="sha256:" + hashlib.sha256(a.metrics).hexdigest(),
                error_class=rej.error_class, reason=Reason.SINK_REJECTED, message=rej.message,
                step=bq_rows.SINK_STEP, event_time_us=a.watermark_us, processing_time_us=a.emitted_us))
        self._written.inc(len(records) - len(rejections))

    def _dead_letters(self, batch):
        layout = bq_rows.dead_letters_layout(self._wh)
        schema = self._bq.provide(layout, layout.base)
        records = dict(bq_rows.dead_letter_record(d) for d in batch)
        rejections = self._bq.write(layout, schema, list(records.items()), self._method)
        if rejections:  # nowhere further to put them: retry once without the payload, then fail loudly
            retry = [(r.key, bq_rows.strip_payload(records[r.key], r.message[:200])) for r in rejections]
            still = self._bq.write(layout, schema, retry, self._method)
            if still:
                raise RuntimeError(f"dead-letter table {layout.table} rejected {len(still)} records even without "
                                   f"payload, first: {still[0].message}")
        self._written.inc(len(records))
        if ledger.active():
            ledger.dead_letters_durable([d.coords for d in batch])
        return iter(())


_SHARDS = 8  # parallel writers per table for bounded input (and load jobs per table per run, at least)


def _chunked(items, size: int):
    chunk: list = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _shard(ident: str) -> int:
    return int(hashlib.sha256(ident.encode()).hexdigest()[:8], 16) % _SHARDS


def _table_key(element) -> str:
    return f"{element.table}#{_shard(element.row_id)}"


def _agg_key(element) -> str:
    return f"{element.partner}#{_shard(element.key)}"


def _dl_key(element) -> str:
    return f"{element.partner}#{_shard(element.coords)}"


class WriteToBigQueryWarehouse(beam.PTransform):
    """{"rows": PCollection[TableRow], "aggregates": PCollection[AggregateRow],
    "dead_letters": PCollection[DeadLetter]} -> BigQuery ``warehouse.project:warehouse.dataset``.

    ``tables`` maps partner -> its main TableSpec (child tables are ``<name>__<child>``);
    ``modes`` maps partner -> SchemaMode for type conflicts (default ``evolve``).
    Returns the PCollection of sink-side dead letters (also written to the dead-letter table).
    """

    def __init__(self, warehouse: WarehouseSpec, tables: Mapping[str, TableSpec],
                 modes: Optional[Mapping[str, SchemaMode]] = None, label: str = "WriteToBigQueryWarehouse"):
        super().__init__(label)
        if warehouse.kind != "bigquery":
            raise ValueError(f"warehouse.kind is {warehouse.kind!r}; WriteToBigQueryWarehouse needs 'bigquery'")
        if not tables:
            raise ValueError("WriteToBigQueryWarehouse needs at least one partner table")
        names = [s.name for s in tables.values()]
        reserved = {warehouse.dead_letter_table, warehouse.aggregates_table} & set(names)
        if reserved:
            raise ValueError(f"partner table name(s) {sorted(reserved)} collide with the dead-letter/aggregates tables")
        if len(set(names)) != len(names):
            raise ValueError(f"two partners share a table name: {names}")
        unknown = set(modes or {}) - set(tables)
        if unknown:
            raise ValueError(f"schema modes for unknown partners {sorted(unknown)}")
        self._wh = warehouse
        self._tables = dict(tables)
        self._modes = dict(modes or {})

    def _group(self, size: int, bounded: bool) -> beam.PTransform:
        # Bounded: one group per (table, shard), written in chunks. Unbounded: batches that flush
        # when full or after max_buffering_s.
        if bounded:
            return beam.GroupByKey()
        # Not beam.GroupIntoBatches: its state coders are always pickled in Beam 2.77 (sinks/batches.py).
        return BatchPerKey(size, self._wh.bigquery.max_buffering_s)

    def expand(self, pcolls):
        wh = self._wh
        rows, aggs, dls = pcolls["rows"], pcolls["aggregates"], pcolls["dead_letters"]
        method = _method(wh, rows.is_bounded)
        size = wh.bigquery.insert_batch_rows if method == "streaming_inserts" else wh.bigquery.load_batch_rows
        args = (wh, self._tables, self._modes, method)
        written = (
            rows
            | "KeyRowsByTable" >> beam.Map(lambda r: (_table_key(r), r)).with_output_types(_KEYED_ROWS)
            | "BatchRows" >> self._group(size, rows.is_bounded)
            | "WriteRows" >> beam.ParDo(_WriteBatchFn("rows", *args)).with_output_types(
                bytes, **{_REJECTED: DeadLetter}).with_outputs(_REJECTED, main="written"))
        agg_written = (
            aggs
            | "KeyAggregates" >> beam.Map(lambda a: (_agg_key(a), a)).with_output_types(_KEYED_AGGREGATES)
            | "BatchAggregates" >> self._group(size, aggs.is_bounded)
            | "WriteAggregates" >> beam.ParDo(_WriteBatchFn("aggregates", *args)).with_output_types(
                bytes, **{_REJECTED: DeadLetter}).with_outputs(_REJECTED, main="written"))
        sink_dead = ((written[_REJECTED], agg_written[_REJECTED])
                     | "SinkRejections" >> beam.Flatten())
        _ = (
            (dls, sink_dead)
            | "AllSinkDeadLetters" >> beam.Flatten()
            | "KeyDeadLetters" >> beam.Map(lambda d: (_dl_key(d), d)).with_output_types(_KEYED_DEAD_LETTERS)
            | "BatchDeadLetters" >> self._group(size, dls.is_bounded and sink_dead.is_bounded)
            | "WriteDeadLetters" >> beam.ParDo(_WriteBatchFn("dead_letters", *args)).with_output_types(bytes))
        return sink_dead
