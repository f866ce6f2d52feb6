"""Backfills into BigQuery (bqemulator), history read from fake-gcs-server and moto S3.

1,000 events over 5 days are first written the way the stream writes them (the unified pipeline
with insertAll and the rows' deterministic ids). Then, each through ``run_backfill`` (waves into a
staging dataset, then MERGE statements; bqemulator runs them all):

* ``fill`` over an overlapping range -> 0 rows inserted, no duplicate ``_row_id`` anywhere;
* ``columns`` from history carrying a new attribute -> every one of the 1,000 rows has its value;
* ``replace`` of 2 DAY partitions by changed history -> those partitions (main and child table)
  are exactly the new history, every other partition is unchanged row for row.
"""
from __future__ import annotations

import gzip
import io

import orjson
import pytest

from backfill.planner import build_plan
from backfill.runner import run_backfill
from backfill.spec import BackfillSpec
from ingest.contract import parse_contract
from sinks.bq_client import make_client
from tests.backfill.test_backfill_duckdb import D1, DAY_US, _event  # the same history on both warehouses
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)
from tests.ingest.test_objectstore import upload_gcs, upload_s3

pytestmark = pytest.mark.integration

_FAST = {"max_attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 0.5, "request_timeout_s": 60}


def _chunks(events: list[dict], per_chunk: int = 100) -> dict[int, bytes]:
    return {k: gzip.compress(b"".join(orjson.dumps(e) + b"\n" for e in events[k * per_chunk:(k + 1) * per_chunk]))
            for k in range((len(events) + per_chunk - 1) // per_chunk)}


def _contract(dataset: str, endpoint: str, pattern: str, method: str):
    return parse_contract({
        "warehouse": {"kind": "bigquery", "project": "headwater-local", "dataset": dataset, "endpoint": endpoint,
                      "bigquery": {"method": method, **_FAST}},
        "masking": {"allow_dev_key": True},
        "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": pattern}],
                      "table": {"name": "acme_events", "partition_granularity": "DAY"}}]})


def _rows(client, sql: str) -> list[dict]:
    return [dict(r) for r in client.query(sql).result(retry=None)]


def _snapshot(client, ref: str, table: str, where: str = "TRUE") -> list[tuple]:
    return sorted(tuple(sorted(r.items())) for r in _rows(client, f"SELECT * FROM `{ref}.{table}` WHERE {where}"))


def test_fill_columns_replace_on_bigquery(cloud_services, monkeypatch):
    from ingest.pipeline import run

    for k, v in cloud_services.env().items():
        monkeypatch.setenv(k, v)
    gbucket, sbucket = unique_id("hwbfg").replace("_", "-"), unique_id("hwbfs").replace("_", "-")
    dataset = unique_id("hw_bf")
    events = [_event(i) for i in range(1000)]
    chunks = _chunks(events)  # 10 chunks of 100: 0-4 in GCS, 5-9 in S3
    upload_gcs(cloud_services.gcs, gbucket, {f"hist/v1/part-{k:02d}.jsonl.gz": d for k, d in chunks.items() if k < 5})
    upload_s3(cloud_services.s3, sbucket, {f"hist/v1/part-{k:02d}.jsonl.gz": d for k, d in chunks.items() if k >= 5})
    sources = (f"gs://{gbucket}/hist/v1/*.jsonl.gz", f"s3://{sbucket}/hist/v1/*.jsonl.gz")

    # --- the stream's writes: insertAll with the deterministic row ids
    live = _contract(dataset, cloud_services.bigquery, sources[0], "streaming_inserts")
    run(live, [])
    run(_contract(dataset, cloud_services.bigquery, sources[1], "streaming_inserts"), [])
    client = make_client(live.warehouse)
    ref = f"headwater-local.{dataset}"
    count = f"SELECT COUNT(*) AS n, COUNT(DISTINCT _row_id) AS d FROM `{ref}.%s`"
    assert _rows(client, count % "acme_events") == [{"n": 1000, "d": 1000}]
    assert _rows(client, count % "acme_events__items") == [{"n": 2000, "d": 2000}]

    # --- plan: lists both stores, writes nothing
    spec = BackfillSpec(partner="acme", patterns=sources, start_us=D1 + DAY_US, end_us=D1 + 4 * DAY_US,
                        backfill_id="fill1", wave_chunks=4)
    plan = build_plan(live, spec)
    assert plan["chunks"]["count"] == 10 and plan["partitions"]["count"] == 3
    assert plan["existing"]["acme_events"]["rows_in_range"] == 600
    assert "left exactly as they are" in plan["effect"]
    assert "fill1" not in " ".join(d.dataset_id for d in client.list_datasets())

    # --- fill over an overlapping range: nothing new, nothing twice
    out = io.StringIO()
    assert run_backfill(live, spec, out=out, err=io.StringIO()) == 0, out.getvalue()
    text = out.getvalue()
    assert "1,000 records in = 600 rows + 0 dead letters + 0 duplicates + 400 out of range -> OK" in text, text
    assert _rows(client, count % "acme_events") == [{"n": 1000, "d": 1000}]
    assert _rows(client, count % "acme_events__items") == [{"n": 2000, "d": 2000}]
    ledger = _rows(client, f"SELECT kind, COUNT(DISTINCT uri) AS u, COUNT(*) AS n FROM `{ref}._headwater_backfills` "
                           "WHERE backfill_id = 'fill1' GROUP BY kind ORDER BY kind")
    assert ledger == [{"kind": "apply", "u": 0, "n": 1}, {"kind": "chunk", "u": 10, "n": 10},
                      {"kind": "params", "u": 0, "n": 1}, {"kind": "wave", "u": 0, "n": 3}]
    # the same backfill again changes nothing
    again = io.StringIO()
    assert run_backfill(live, spec, out=again, err=io.StringIO()) == 0
    assert "already applied" in again.getvalue()
    assert _rows(client, count % "acme_events") == [{"n": 1000, "d": 1000}]

    # --- columns: history now carries loyalty_tier; only that column is set, on all 1,000 rows
    tiered = [_event(i, loyalty_tier=f"tier{i % 3}") for i in range(1000)]
    upload_gcs(cloud_services.gcs, gbucket, {f"hist/v2/part-{k:02d}.jsonl.gz": d for k, d in _chunks(tiered).items()})
    before = {r["_row_id"]: r for r in _rows(client, f"SELECT * FROM `{ref}.acme_events`")}
    cspec = BackfillSpec(partner="acme", patterns=(f"gs://{gbucket}/hist/v2/*.jsonl.gz",), mode="columns",
                         columns=("loyalty_tier",), backfill_id="tiers")
    out = io.StringIO()
    assert run_backfill(live, cspec, out=out, err=io.StringIO()) == 0, out.getvalue()
    after = {r["_row_id"]: r for r in _rows(client, f"SELECT * FROM `{ref}.acme_events`")}
    assert len(after) == 1000
    for rid, row in after.items():
        i = int(row["_event_id"][2:])
        assert row["loyalty_tier"] == f"tier{i % 3}"
        assert {k: v for k, v in row.items() if k != "loyalty_tier"} == before[rid]
    assert _rows(client, count % "acme_events__items") == [{"n": 2000, "d": 2000}]

    # --- replace 2 partitions (Mar 2 and 3) by changed history: every 4th event gone, amounts changed
    changed = [dict(e, amount=e["amount"] + 10_000) for i, e in enumerate(events[200:600]) if i % 4]
    upload_gcs(cloud_services.gcs, gbucket, {f"hist/v3/part-{k:02d}.jsonl.gz": d for k, d in _chunks(changed).items()})
    outside = "_event_time < TIMESTAMP '2026-03-02' OR _event_time >= TIMESTAMP '2026-03-04'"
    main_out, child_out = _snapshot(client, ref, "acme_events", outside), _snapshot(client, ref, "acme_events__items", outside)
    rspec = BackfillSpec(partner="acme", patterns=(f"gs://{gbucket}/hist/v3/*.jsonl.gz",), mode="replace",
                         start_us=D1 + DAY_US, end_us=D1 + 3 * DAY_US, backfill_id="fix_days")
    out = io.StringIO()
    assert run_backfill(live, rspec, out=out, err=io.StringIO()) == 0, out.getvalue()
    assert _snapshot(client, ref, "acme_events", outside) == main_out
    assert _snapshot(client, ref, "acme_events__items", outside) == child_out
    inside = _rows(client, f"SELECT _event_id, amount, loyalty_tier FROM `{ref}.acme_events` WHERE NOT ({outside}) "
                           "ORDER BY _event_id")
    assert inside == [{"_event_id": e["id"], "amount": e["amount"], "loyalty_tier": None} for e in changed]
    kids = _rows(client, f"SELECT COUNT(*) AS n FROM `{ref}.acme_events__items` WHERE NOT ({outside})")
    assert kids == [{"n": 2 * len(changed)}]
    assert _rows(client, count % "acme_events") == [{"n": 900, "d": 900}]
    # the staging datasets are gone after each apply
    assert not [d.dataset_id for d in client.list_datasets() if d.dataset_id.startswith(f"{dataset}__backfill_")]
