"""``replay`` on BigQuery (bqemulator): missing_user_id dead letters become rows after the contract fix, once."""
from __future__ import annotations

import gzip
import io

import orjson
import pytest

from backfill.replay import replay
from ingest.contract import parse_contract
from sinks.bq_client import make_client
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)
from tests.ingest.test_objectstore import upload_gcs

pytestmark = pytest.mark.integration

_FAST = {"max_attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 0.5, "request_timeout_s": 60}


def _contract(dataset, endpoint, pattern, user_id):
    return parse_contract({
        "warehouse": {"kind": "bigquery", "project": "headwater-local", "dataset": dataset, "endpoint": endpoint,
                      "bigquery": {"method": "streaming_inserts", **_FAST}},
        "masking": {"allow_dev_key": True},
        "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": pattern}],
                      "envelope": {"user_id": user_id},
                      "columns": [{"path": "profile.email", "pii": "tokenize"}],
                      "table": {"name": "acme_events"}}]})


def test_replay_on_bigquery(cloud_services, monkeypatch):
    from ingest.pipeline import run

    for k, v in cloud_services.env().items():
        monkeypatch.setenv(k, v)
    bucket, dataset, ref_ds = unique_id("hwrp").replace("_", "-"), unique_id("hw_rp"), unique_id("hw_rpref")
    events = [{"id": f"e{i}", "timestamp": f"2026-03-01T10:{i:02d}:00Z",
               "profile": {"uid": f"u{i % 4}", "email": f"p{i}@ex.com"}, "n": i} for i in range(40)]
    upload_gcs(cloud_services.gcs, bucket, {"h/part-0.jsonl.gz": gzip.compress(
        b"".join(orjson.dumps(e) + b"\n" for e in events))})
    pattern = f"gs://{bucket}/h/*.jsonl.gz"
    run(_contract(dataset, cloud_services.bigquery, pattern, "user.id"), [])
    fixed = _contract(dataset, cloud_services.bigquery, pattern, "profile.uid")
    client = make_client(fixed.warehouse)
    q = lambda sql: [dict(r) for r in client.query(sql).result(retry=None)]  # noqa: E731
    assert q(f"SELECT reason, COUNT(*) AS n FROM `headwater-local.{dataset}.dead_letters` GROUP BY reason") == \
        [{"reason": "missing_user_id", "n": 40}]

    out = io.StringIO()
    assert replay(fixed, reason="missing_user_id", replay_id="fix_uid", out=out) == 0, out.getvalue()
    assert "40 records in = 40 rows + 0 dead letters + 0 duplicates + 0 out of range -> OK" in out.getvalue()
    run(_contract(ref_ds, cloud_services.bigquery, pattern, "profile.uid"), [])  # a fresh run of the fixed contract
    rows = q(f"SELECT * FROM `headwater-local.{dataset}.acme_events` ORDER BY _row_id")
    assert rows == q(f"SELECT * FROM `headwater-local.{ref_ds}.acme_events` ORDER BY _row_id")
    assert len(rows) == 40 and all(r["profile__email"].startswith("tok_") for r in rows)
    assert q(f"SELECT result, COUNT(*) AS n FROM `headwater-local.{dataset}._headwater_replays` GROUP BY result") == \
        [{"result": "row", "n": 40}]
    again = io.StringIO()
    assert replay(fixed, replay_id="again", out=again) == 0
    assert "0 dead letters match" in again.getvalue()
    assert q(f"SELECT COUNT(*) AS n FROM `headwater-local.{dataset}.acme_events`") == [{"n": 40}]
