"""BigQuery sink against the real local emulator (bqemulator), fed by the real pipeline from gs:// and s3://.

* ``test_pipeline_gcs_s3_to_bigquery``: the headwater pipeline (ingest.pipeline.run) reads JSONL.gz chunks
  from fake-gcs-server and Avro chunks from moto into bqemulator. Run 1 (load jobs): partitioning,
  clustering, child table, a partition-filtered query. Run 2 (streaming inserts): a new attribute adds a
  column; an event too large for BigQuery lands in the dead-letter table.
* ``test_sink_rejected_rows_are_dead_lettered``: TableRows whose value BigQuery refuses (the emulator answers
  HTTP 500 for the whole request) are isolated by bisection and dead-lettered; the rest of the batch lands.
"""
from __future__ import annotations

import gzip
import io

import apache_beam as beam
import fastavro
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from google.cloud import bigquery

from flatten.records import TableRow
from ingest.contract import parse_contract
from ingest.objectstore import configure_gcs_emulator, objectstore_options
from sinks.bigquery_sink import WriteToBigQueryWarehouse
from sinks.bq_client import make_client
from sinks.spec import TableSpec, WarehouseSpec
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)
from tests.ingest.test_objectstore import upload_gcs, upload_s3

pytestmark = pytest.mark.integration

_FAST = {"max_attempts": 2, "initial_backoff_s": 0.05, "max_backoff_s": 0.2, "request_timeout_s": 30}
_AVRO = fastavro.parse_schema({"type": "record", "name": "Event", "fields": [
    {"name": "id", "type": "string"}, {"name": "timestamp", "type": "string"},
    {"name": "user", "type": {"type": "record", "name": "User", "fields": [{"name": "id", "type": "string"}]}},
    {"name": "amount", "type": "long"},
    {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "Item", "fields": [
        {"name": "sku", "type": "string"}]}}}]})


def _ev(i: int, day: int, **extra) -> dict:
    return {"id": f"ev{i}", "timestamp": f"2026-03-0{day}T1{i % 10}:00:00Z", "user": {"id": f"u{i % 3}"},
            "amount": i * 10, "items": [{"sku": f"sku{i}"}], **extra}


def _jsonl_gz(events) -> bytes:
    return gzip.compress(b"".join(orjson.dumps(e) + b"\n" for e in events))


def _avro(events) -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, _AVRO, events)
    return buf.getvalue()


def _contract(dataset: str, endpoint: str, gbucket: str, sbucket: str, chunk: str, method: str) -> object:
    return parse_contract({
        "warehouse": {"kind": "bigquery", "project": "headwater-local", "dataset": dataset, "endpoint": endpoint,
                      "bigquery": {"method": method, **_FAST}},
        "masking": {"allow_dev_key": True},
        "partners": [{
            "name": "acme",
            "sources": [{"kind": "file", "pattern": f"gs://{gbucket}/acme/{chunk}/*.jsonl.gz"},
                        {"kind": "file", "pattern": f"s3://{sbucket}/acme/{chunk}/*.avro"}],
            "envelope": {"max_payload_bytes": 16 * 1024 * 1024},
            "table": {"name": "acme_events", "partition_granularity": "DAY", "clustering": ["_user_id"]},
        }]})


def _query(client: bigquery.Client, sql: str) -> list[dict]:
    return [dict(r) for r in client.query(sql).result(retry=None)]


def test_pipeline_gcs_s3_to_bigquery(cloud_services):
    from ingest.pipeline import run

    env = cloud_services.env()
    configure_gcs_emulator(env)
    argv = objectstore_options(env)
    gbucket, sbucket = unique_id("hwg").replace("_", "-"), unique_id("hws").replace("_", "-")
    dataset = unique_id("hw_it")
    # chunk 1: day 1 and day 2 events, GCS JSONL.gz + S3 Avro
    upload_gcs(cloud_services.gcs, gbucket, {"acme/c1/part-0.jsonl.gz": _jsonl_gz([_ev(1, 1), _ev(2, 2), _ev(3, 2)])})
    upload_s3(cloud_services.s3, sbucket, {"acme/c1/part-0.avro": _avro([_ev(4, 1), _ev(5, 2)])})
    c1 = _contract(dataset, cloud_services.bigquery, gbucket, sbucket, "c1", "auto")  # bounded -> load jobs
    run(c1, argv)

    client = make_client(c1.warehouse)
    ref = f"headwater-local.{dataset}"
    t = client.get_table(f"{ref}.acme_events", retry=None)
    assert (t.time_partitioning.type_, t.time_partitioning.field) == ("DAY", "_event_time")
    assert t.clustering_fields == ["_user_id"]
    child = client.get_table(f"{ref}.acme_events__items", retry=None)
    assert (child.time_partitioning.type_, child.time_partitioning.field) == ("DAY", "_event_time")
    assert child.clustering_fields == ["_event_id"]
    day2 = _query(client, f"SELECT _event_id, amount FROM `{ref}.acme_events` WHERE _event_time >= "
                          f"TIMESTAMP('2026-03-02') AND _event_time < TIMESTAMP('2026-03-03') ORDER BY _event_id")
    assert day2 == [{"_event_id": "ev2", "amount": 20}, {"_event_id": "ev3", "amount": 30},
                    {"_event_id": "ev5", "amount": 50}]
    skus = _query(client, f"SELECT _event_id, items__sku AS sku FROM `{ref}.acme_events__items` ORDER BY _event_id") \
        if "items__sku" in {f.name for f in child.schema} else \
        _query(client, f"SELECT _event_id, sku FROM `{ref}.acme_events__items` ORDER BY _event_id")
    assert [r["_event_id"] for r in skus] == ["ev1", "ev2", "ev3", "ev4", "ev5"]
    assert "loyalty_tier" not in {f.name for f in t.schema}

    # chunk 2, written with streaming inserts: a new attribute adds a column; a row over BigQuery's
    # 10 MB streaming row limit is rejected into the dead-letter table, the rest of the batch lands.
    huge = _ev(7, 3, note="x" * (10 * 1024 * 1024 + 10))
    upload_gcs(cloud_services.gcs, gbucket, {"acme/c2/part-0.jsonl.gz": _jsonl_gz([_ev(6, 3, loyalty_tier="gold"), huge])})
    upload_s3(cloud_services.s3, sbucket, {"acme/c2/part-0.avro": _avro([_ev(8, 3)])})
    run(_contract(dataset, cloud_services.bigquery, gbucket, sbucket, "c2", "streaming_inserts"), argv)

    t = client.get_table(f"{ref}.acme_events", retry=None)
    assert {"loyalty_tier": "STRING"}.items() <= {f.name: f.field_type for f in t.schema}.items()
    day3 = _query(client, f"SELECT _event_id, loyalty_tier FROM `{ref}.acme_events` WHERE _event_time >= "
                          f"TIMESTAMP('2026-03-03') ORDER BY _event_id")
    assert day3 == [{"_event_id": "ev6", "loyalty_tier": "gold"}, {"_event_id": "ev8", "loyalty_tier": None}]
    dead = _query(client, f"SELECT partner, reason, error_class, coords, step, message, payload_ref, "
                          f"LENGTH(payload) AS n FROM `{ref}.dead_letters` WHERE source = 'warehouse'")
    assert len(dead) == 1, dead
    d = dead[0]
    assert (d["partner"], d["reason"], d["error_class"]) == ("acme", "too_large", "RowTooLarge")
    assert d["coords"].startswith("bigquery:acme_events/") and d["step"] == "WriteWarehouse/BigQuery"
    assert "10485760 byte limit" in d["message"] and d["payload_ref"].startswith("sha256:")
    dl = client.get_table(f"{ref}.dead_letters", retry=None)
    assert (dl.time_partitioning.field, dl.clustering_fields) == ("timestamp", ["partner", "reason"])


@pytest.mark.parametrize("method", ["file_loads", "streaming_inserts"])
def test_sink_rejected_rows_are_dead_lettered(cloud_services, method):
    dataset = unique_id("hw_sink")
    wh = WarehouseSpec(kind="bigquery", project="headwater-local", dataset=dataset, endpoint=cloud_services.bigquery,
                       bigquery={"method": method, **_FAST})
    spec = TableSpec(name="acme_events", partition_granularity="HOUR", clustering=("_user_id",))
    types = {"_event_id": "STRING", "_user_id": "STRING", "_event_time": "TIMESTAMP", "n": "INT64"}

    def row(i: int, n) -> TableRow:
        cols = {"_event_id": f"e{i}", "_user_id": f"u{i % 2}", "_event_time": "2026-03-01T10:00:00.000000Z", "n": n}
        return TableRow("acme", "acme_events", f"r{i}", f"e{i}", 1772359200000000, orjson.dumps(cols),
                        orjson.dumps(types))

    # r5's types claim INT64 but the value is text: BigQuery refuses the row (schema mismatch).
    rows = [row(i, i) for i in range(8)]
    rows[5] = row(5, "not-a-number")
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        _ = ({"rows": p | "Rows" >> beam.Create(rows), "aggregates": p | "Aggs" >> beam.Create([]),
              "dead_letters": p | "Dead" >> beam.Create([])}
             | "WriteBigQuery" >> WriteToBigQueryWarehouse(wh, {"acme": spec}))
    client = make_client(wh)
    ref = f"headwater-local.{dataset}"
    got = _query(client, f"SELECT _row_id, n FROM `{ref}.acme_events` ORDER BY n")
    assert got == [{"_row_id": f"r{i}", "n": i} for i in range(8) if i != 5]
    dead = _query(client, f"SELECT coords, reason, payload FROM `{ref}.dead_letters`")
    assert [(d["coords"], d["reason"]) for d in dead] == [("bigquery:acme_events/r5", "sink_rejected")]
    assert orjson.loads(dead[0]["payload"])["n"] == "not-a-number"


@pytest.mark.parametrize("method", ["file_loads", "streaming_inserts"])
def test_integers_beyond_int64_round_trip(cloud_services, method):
    """2**70 is NUMERIC in BigQuery as in DuckDB (tests/ingest/test_pipeline.py): its digits come back exact."""
    from flatten.fast import FastFlattener
    from flatten.options import FlattenOptions

    dataset = unique_id("hw_big")
    wh = WarehouseSpec(kind="bigquery", project="headwater-local", dataset=dataset, endpoint=cloud_services.bigquery,
                       bigquery={"method": method, **_FAST})
    ff = FastFlattener(FlattenOptions())
    rows = []
    for i, v in enumerate([2**70, -(2**70), 2**64, 12345678901234567890123456789]):
        payload = f'{{"big": {v}, "nested": {{"n": {v}}}}}'.encode()
        for table, rid, cols, types in ff.rows(payload, f"e{i}", "u", 1772359200000000):
            rows.append(TableRow("acme", "acme_events", rid, f"e{i}", 1772359200000000, cols, types))
    assert all(orjson.loads(r.types)["big"] == "NUMERIC" for r in rows)
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        _ = ({"rows": p | "Rows" >> beam.Create(rows), "aggregates": p | "Aggs" >> beam.Create([]),
              "dead_letters": p | "Dead" >> beam.Create([])}
             | "WriteBigQuery" >> WriteToBigQueryWarehouse(wh, {"acme": TableSpec(name="acme_events")}))
    client = make_client(wh)
    t = client.get_table(f"headwater-local.{dataset}.acme_events", retry=None)
    assert {f.name: f.field_type for f in t.schema}["big"] == "NUMERIC"
    got = _query(client, f"SELECT _event_id, CAST(big AS STRING) AS big, CAST(nested__n AS STRING) AS n "
                         f"FROM `headwater-local.{dataset}.acme_events` ORDER BY _event_id")
    want = [2**70, -(2**70), 2**64, 12345678901234567890123456789]
    assert [(r["_event_id"], int(r["big"].split(".")[0]), int(r["n"].split(".")[0])) for r in got] == \
        [(f"e{i}", v, v) for i, v in enumerate(want)]
