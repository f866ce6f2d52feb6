"""Pure BigQuery row and table logic for the BigQuery sink (no Beam, no network).

Everything here is a function of its arguments, so the Beam DoFns in
``sinks.bigquery_sink`` and the client in ``sinks.bq_client`` stay thin:

* table layout: which column partitions / clusters a partner table, its child
  tables (``<table>__<child>``), the aggregates and the dead-letter table;
* schema conversion between ``flatten.schema.TableSchema`` and BigQuery
  ``schema.fields`` JSON;
* batch preparation: reconcile each ``TableRow`` with the table schema
  (``flatten.schema.reconcile``) and split the batch into rows to write and
  dead letters (freeze-mode conflicts);
* deterministic ids: insertAll row ids are ``TableRow.row_id``; load job ids
  are a hash of the table and the batch's row ids;
* error classification: which BigQuery errors are terminal (dead-letter the
  row) and which are transient (retry with a bound).
"""
from __future__ import annotations

import hashlib
import time
from typing import Iterable, NamedTuple, Optional, Sequence

import orjson

from flatten.options import SchemaMode
from flatten.records import AggregateRow, DeadLetter, Reason, TableRow
from flatten.schema import ColumnSchema, TableSchema, conflict_message, reconcile
from sinks.spec import TableSpec, WarehouseSpec

__all__ = [
    "ROW_ID",
    "SINK_STEP",
    "TableLayout",
    "layout_for_row_table",
    "aggregates_layout",
    "dead_letters_layout",
    "from_bigquery_fields",
    "merge_schema",
    "Prepared",
    "prepare_rows",
    "aggregate_record",
    "dead_letter_record",
    "load_job_id",
    "is_terminal_reason",
    "rejected",
    "strip_payload",
]

ROW_ID = "_row_id"
SINK_STEP = "WriteWarehouse/BigQuery"
# insertAll per-row error reasons that mean "this row can never be written as is".
# https://cloud.google.com/bigquery/docs/error-messages ; "stopped" rows were fine but were
# not written because another row in the request was invalid: they are retried, not dead-lettered.
_TERMINAL_REASONS = frozenset({"invalid", "invalidQuery", "notImplemented", "accessDenied", "duplicate"})
_BQ_TYPE_ALIASES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "BIGDECIMAL": "BIGNUMERIC",
                    "DECIMAL": "NUMERIC"}


class TableLayout(NamedTuple):
    """Where and how one BigQuery table is laid out. ``base`` columns always exist (created up front)."""

    table: str
    partner: str
    partition_field: str
    partition_type: str  # HOUR | DAY | MONTH | YEAR
    clustering: tuple[str, ...]
    base: TableSchema

    def clustering_for(self, schema: TableSchema) -> tuple[str, ...]:
        """Clustering columns that exist in ``schema`` (BigQuery refuses to cluster on a missing column)."""
        return tuple(c for c in self.clustering if c in schema)

    def resource_extras(self, schema: TableSchema) -> dict:
        """``timePartitioning`` / ``clustering`` of the tables.insert body."""
        out: dict = {"timePartitioning": {"type": self.partition_type, "field": self.partition_field}}
        cl = self.clustering_for(schema)
        if cl:
            out["clustering"] = {"fields": list(cl)}
        return out


def layout_for_row_table(table: str, partner: str, spec: TableSpec) -> TableLayout:
    """Layout of a partner's main table (``table == spec.name``) or one of its child tables.

    Main table: partitioned on ``spec.partition_column`` (declared TIMESTAMP up front, so
    the table can be created even if the first rows lack it), clustered on ``spec.clustering``.
    Child tables (``<name>__<child>``): partitioned on ``_event_time`` (every child row has
    it) at the same granularity, clustered on the spec's clustering columns that child rows
    carry, else on ``_event_id`` (the join key back to the parent event).
    """
    if table == spec.name:
        base = TableSchema((ColumnSchema(ROW_ID, "STRING", "NULLABLE"),
                            ColumnSchema(spec.partition_column, "TIMESTAMP", "NULLABLE")))
        return TableLayout(table, partner, spec.partition_column, spec.partition_granularity,
                           tuple(spec.clustering), base)
    if not table.startswith(spec.name + "__"):
        raise ValueError(f"table {table!r} is neither partner {partner!r}'s table {spec.name!r} nor one of its children")
    base = TableSchema((ColumnSchema(ROW_ID, "STRING", "NULLABLE"), ColumnSchema("_event_time", "TIMESTAMP", "NULLABLE")))
    child_cl = tuple(c for c in spec.clustering if c in ("_event_id", "_parent_row_id", "_event_time", ROW_ID))
    return TableLayout(table, partner, "_event_time", spec.partition_granularity, child_cl or ("_event_id",), base)


_AGG_COLUMNS = (("partner", "STRING"), ("aggregate", "STRING"), ("key", "STRING"), ("window", "STRING"),
                ("metrics", "JSON"), ("watermark", "TIMESTAMP"), ("version", "INT64"), ("emitted_at", "TIMESTAMP"),
                ("final", "BOOL"), (ROW_ID, "STRING"))
# Shaped like Dataflow templates' *_error_records tables (timestamp, payload, error message,
# stack/step), plus headwater's one dead-letter record shape (flatten.records.DeadLetter).
_DL_COLUMNS = (("timestamp", "TIMESTAMP"), ("event_time", "TIMESTAMP"), ("partner", "STRING"), ("source", "STRING"),
               ("coords", "STRING"), ("payload", "STRING"), ("payload_truncated", "BOOL"), ("payload_ref", "STRING"),
               ("error_class", "STRING"), ("reason", "STRING"), ("message", "STRING"), ("step", "STRING"),
               (ROW_ID, "STRING"))


def aggregates_layout(wh: WarehouseSpec) -> TableLayout:
    cols = TableSchema(tuple(ColumnSchema(n, t, "NULLABLE") for n, t in _AGG_COLUMNS))
    return TableLayout(wh.aggregates_table, "", "emitted_at", "DAY", ("partner", "aggregate", "key"), cols)


def dead_letters_layout(wh: WarehouseSpec) -> TableLayout:
    cols = TableSchema(tuple(ColumnSchema(n, t, "NULLABLE") for n, t in _DL_COLUMNS))
    return TableLayout(wh.dead_letter_table, "", "timestamp", "DAY", ("partner", "reason"), cols)


def from_bigquery_fields(fields: Iterable[dict]) -> TableSchema:
    """BigQuery ``schema.fields`` JSON -> TableSchema (legacy type names normalised)."""
    cols = []
    for f in fields:
        t = str(f.get("type", "STRING")).upper()
        cols.append(ColumnSchema(f["name"], _BQ_TYPE_ALIASES.get(t, t), str(f.get("mode") or "NULLABLE").upper()))
    return TableSchema(tuple(cols), 1 if cols else 0)


def merge_schema(live: TableSchema, wanted: TableSchema) -> TableSchema:
    """``live`` plus the columns of ``wanted`` it lacks (additions only; BigQuery never drops here)."""
    extra = tuple(c for c in wanted.columns if c.name not in live)
    return live if not extra else TableSchema(live.columns + extra, live.version + 1)


class Prepared(NamedTuple):
    """A table batch after schema reconciliation."""

    schema: TableSchema  # the schema the rows need (live schema + new NULLABLE/REPEATED columns)
    records: list  # [(row_id, {column: value})] in input order, duplicates (same row id) removed
    sources: dict  # row_id -> the TableRow (for dead letters)
    dead: list  # DeadLetter for rows rejected before writing (freeze-mode type conflicts)


def prepare_rows(schema: TableSchema, rows: Sequence[TableRow], mode: SchemaMode) -> Prepared:
    """Reconcile every row with ``schema`` (growing it) and attach ``_row_id``.

    Conflicts (only in freeze mode) become dead letters with reason ``type_conflict``.
    """
    records: list = []
    sources: dict = {}
    dead: list = []
    for r in rows:
        if r.row_id in sources:
            continue  # the same row twice in one batch (replay): keep one, dedup is by row id
        cols = orjson.loads(r.row)
        types = orjson.loads(r.types)
        cols[ROW_ID] = r.row_id
        types[ROW_ID] = "STRING"
        rec = reconcile(schema, cols, types, mode)
        if rec.conflicts:
            dead.append(rejected(r, Reason.TYPE_CONFLICT, "TypeConflict",
                                 f"table {r.table}: {conflict_message(rec.conflicts)}"))
            continue
        schema = rec.schema
        sources[r.row_id] = r
        records.append((r.row_id, rec.columns))
    return Prepared(schema, records, sources, dead)


def _ts(us: Optional[int]) -> Optional[str]:
    if us is None:
        return None
    secs, frac = divmod(int(us), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:06d}Z"


def aggregate_record(a: AggregateRow) -> tuple[str, dict]:
    """(row id, aggregates-table row). One row per emitted version, so the id includes the version."""
    rid = hashlib.sha256("\x1f".join([a.partner, a.aggregate, a.key, a.window, str(a.version)]).encode()).hexdigest()[:32]
    return rid, {"partner": a.partner, "aggregate": a.aggregate, "key": a.key, "window": a.window,
                 "metrics": a.metrics.decode("utf-8"), "watermark": _ts(a.watermark_us), "version": a.version,
                 "emitted_at": _ts(a.emitted_us), "final": a.final, ROW_ID: rid}


_MAX_PAYLOAD_CHARS = 1_000_000  # keeps a dead-letter row far below BigQuery's 10 MB insertAll row limit


def dead_letter_record(d: DeadLetter) -> tuple[str, dict]:
    """(row id, dead-letter-table row). The payload is already masked by the step that made ``d``."""
    rid = hashlib.sha256("\x1f".join([d.partner, d.coords, d.payload_ref, d.reason, d.step]).encode()).hexdigest()[:32]
    text = d.payload.decode("utf-8", "replace")
    return rid, {"timestamp": _ts(d.processing_time_us), "event_time": _ts(d.event_time_us), "partner": d.partner,
                 "source": d.source, "coords": d.coords, "payload": text[:_MAX_PAYLOAD_CHARS],
                 "payload_truncated": len(text) > _MAX_PAYLOAD_CHARS, "payload_ref": d.payload_ref,
                 "error_class": d.error_class, "reason": d.reason, "message": d.message[:10_000], "step": d.step,
                 ROW_ID: rid}


def strip_payload(record: dict, why: str) -> dict:
    """A dead-letter row BigQuery refused, minus its payload (kept by ``payload_ref``)."""
    out = dict(record)
    out["payload"] = None
    out["payload_truncated"] = True
    out["message"] = (f"{record.get('message') or ''} [payload dropped from the dead-letter row: {why}]")[:10_000]
    return out


def load_job_id(table: str, row_ids: Sequence[str], attempt: int) -> str:
    """Deterministic load job id: a replayed bundle asks for the same job, BigQuery answers 409 and
    the sink checks that job's outcome instead of loading the rows twice."""
    h = hashlib.sha256(table.encode())
    for rid in sorted(row_ids):
        h.update(b"\x1f" + rid.encode())
    return f"headwater_{h.hexdigest()[:40]}_{attempt}"


def is_terminal_reason(reason: Optional[str]) -> bool:
    return (reason or "") in _TERMINAL_REASONS


def rejected(r: TableRow, reason: str, error_class: str, message: str) -> DeadLetter:
    """Dead letter for a warehouse row. ``payload`` is the (already masked) row JSON."""
    return DeadLetter(partner=r.partner, source="warehouse", coords=f"bigquery:{r.table}/{r.row_id}",
                      payload=r.row, payload_ref="sha256:" + hashlib.sha256(r.row).hexdigest(),
                      error_class=error_class, reason=reason, message=message[:10_000], step=SINK_STEP,
                      event_time_us=r.event_time_us, processing_time_us=int(time.time() * 1_000_000))
