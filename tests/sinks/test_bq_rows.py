"""Pure BigQuery sink logic: layouts, reconciliation into dead letters, deterministic ids, error classes."""
from __future__ import annotations

import orjson
import pytest

from flatten.options import SchemaMode
from flatten.records import AggregateRow, DeadLetter, TableRow
from flatten.schema import TableSchema
from sinks import bq_rows
from sinks.bq_client import _transient
from sinks.spec import TableSpec, WarehouseSpec

SPEC = TableSpec(name="acme_events", partition_column="_event_time", partition_granularity="MONTH",
                 clustering=("_user_id", "country"))


def _row(rid: str, cols: dict, types: dict, table: str = "acme_events") -> TableRow:
    return TableRow("acme", table, rid, "e1", 0, orjson.dumps(cols), orjson.dumps(types))


def test_layouts_main_child_and_system_tables():
    main = bq_rows.layout_for_row_table("acme_events", "acme", SPEC)
    assert (main.partition_field, main.partition_type, main.clustering) == ("_event_time", "MONTH", ("_user_id", "country"))
    # clustering only on columns that exist (BigQuery refuses missing ones); they are patched in later
    assert main.resource_extras(main.base) == {"timePartitioning": {"type": "MONTH", "field": "_event_time"}}
    child = bq_rows.layout_for_row_table("acme_events__items", "acme", SPEC)
    assert (child.partition_field, child.clustering) == ("_event_time", ("_event_id",))
    with pytest.raises(ValueError, match="neither"):
        bq_rows.layout_for_row_table("other__items", "acme", SPEC)
    wh = WarehouseSpec(kind="bigquery", project="p", dataset="d")
    assert bq_rows.dead_letters_layout(wh).partition_field == "timestamp"
    assert bq_rows.aggregates_layout(wh).clustering == ("partner", "aggregate", "key")


def test_prepare_rows_grows_schema_and_dead_letters_freeze_conflicts():
    base = bq_rows.layout_for_row_table("acme_events", "acme", SPEC).base
    rows = [_row("r1", {"_event_time": "2026-01-01T00:00:00.000000Z", "n": 1}, {"_event_time": "TIMESTAMP", "n": "INT64"}),
            _row("r1", {"_event_time": "2026-01-01T00:00:00.000000Z", "n": 1}, {"_event_time": "TIMESTAMP", "n": "INT64"}),
            _row("r2", {"_event_time": "2026-01-01T00:00:00.000000Z", "n": "x", "tags": ["a"]},
                 {"_event_time": "TIMESTAMP", "n": "STRING", "tags": "STRING[]"})]
    frozen = bq_rows.prepare_rows(base, rows, SchemaMode.FREEZE)
    assert [rid for rid, _ in frozen.records] == ["r1"]  # duplicate r1 kept once
    assert frozen.records[0][1]["_row_id"] == "r1"
    assert [(d.reason, d.coords) for d in frozen.dead] == [("type_conflict", "bigquery:acme_events/r2")]
    assert "column 'n' is INT64" in frozen.dead[0].message and frozen.dead[0].step == bq_rows.SINK_STEP
    evolved = bq_rows.prepare_rows(base, rows, SchemaMode.EVOLVE)
    assert not evolved.dead
    assert {"n": "INT64", "n__v_string": "STRING", "tags": "STRING[]"}.items() <= \
        {c.name: c.type + ("[]" if c.mode == "REPEATED" else "") for c in evolved.schema.columns}.items()


def test_bigquery_fields_round_trip_and_merge():
    live = bq_rows.from_bigquery_fields([{"name": "a", "type": "INTEGER"}, {"name": "b", "type": "STRING", "mode": "REPEATED"}])
    assert live.type_of("a") == "INT64" and live.type_of("b") == "STRING[]"
    wanted = TableSchema(live.columns + (("c", "BOOL", "NULLABLE"),))
    assert bq_rows.merge_schema(live, wanted).names() == ("a", "b", "c")
    assert bq_rows.merge_schema(live, live) is live


def test_ids_are_deterministic():
    assert bq_rows.load_job_id("t", ["b", "a"], 0) == bq_rows.load_job_id("t", ["a", "b"], 0)
    assert bq_rows.load_job_id("t", ["a"], 0) != bq_rows.load_job_id("t", ["a"], 1)
    d = DeadLetter("acme", "file", "file:gs://b/x:3", b'{"x":1}', "sha256:ab", "E", "malformed_json", "m", "Parse", None, 5)
    rid, rec = bq_rows.dead_letter_record(d)
    assert rid == bq_rows.dead_letter_record(d._replace(processing_time_us=9))[0]
    assert rec["payload"] == '{"x":1}' and rec["event_time"] is None and rec["timestamp"] == "1970-01-01T00:00:00.000005Z"
    stripped = bq_rows.strip_payload(rec, "too big")
    assert stripped["payload"] is None and stripped["payload_truncated"] and "too big" in stripped["message"]
    a = AggregateRow("acme", "spend", "u1", "7d", b'{"sum":3}', 0, 4, 0, False)
    assert bq_rows.aggregate_record(a)[0] != bq_rows.aggregate_record(a._replace(version=5))[0]


def test_error_classification():
    from google.api_core import exceptions as gexc

    assert bq_rows.is_terminal_reason("invalid") and not bq_rows.is_terminal_reason("stopped")
    assert not bq_rows.is_terminal_reason("backendError")
    assert _transient(gexc.InternalServerError("x")) and _transient(gexc.TooManyRequests("x"))
    assert not _transient(gexc.BadRequest("x"))
    assert _transient(gexc.Forbidden("quota", errors=[{"reason": "rateLimitExceeded"}]))
    assert not _transient(gexc.Forbidden("no", errors=[{"reason": "accessDenied"}]))
