"""The BigQuery sink on a bad day: a fault-injecting proxy (tests/sinks/faultproxy.py) in front of bqemulator.

Injected on the write path: 503/500 bursts, 429, a stalled request past the client timeout, connections
reset before the request is served, a connection reset mid-response *after* the write was committed, and
a 400 for every request carrying one poison row. Shown: retries are bounded and counted (one per injected
transient fault), the poison row alone is dead-lettered, every other row is written exactly once (load
jobs: deterministic job ids; streaming inserts: insertIds, which BigQuery de-duplicates and the proxy does
for the emulator), the job ends, and the counters add up.
"""
from __future__ import annotations

import time

import apache_beam as beam
import orjson
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from google.cloud import bigquery

from flatten.records import TableRow
from sinks.bigquery_sink import WriteToBigQueryWarehouse
from sinks.bq_client import make_client
from sinks.spec import TableSpec, WarehouseSpec
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)
from tests.sinks.faultproxy import FaultProxy

pytestmark = pytest.mark.integration

N, POISON = 40, 17
TYPES = {"_event_id": "STRING", "_user_id": "STRING", "_event_time": "TIMESTAMP", "n": "INT64", "note": "STRING"}
SCHEDULES = {
    # requests on the write path consume these in order ("ok" = forwarded); bursts stay under max_attempts
    "streaming_inserts": (r"^POST \S*/tables/acme_events/insertAll",
                          ["503", "503", "ok", "429", "ok", "timeout", "ok", "reset", "ok", "reset_after", "ok",
                           "500", "ok"]),
    "file_loads": (r"^(PUT|POST) /upload/",
                   ["503", "ok", "ok", "429", "ok", "ok", "reset_after@PUT", "ok", "ok", "timeout@PUT", "ok",
                    "reset@POST", "ok", "500@PUT", "ok"]),
}
TRANSIENT = {"429", "500", "503", "timeout", "reset", "reset_after"}  # ("ok": forwarded untouched)


def _row(i: int) -> TableRow:
    cols = {"_event_id": f"e{i}", "_user_id": f"u{i % 3}", "_event_time": "2026-03-01T10:00:00.000000Z", "n": i,
            "note": "POISON" if i == POISON else "fine"}
    return TableRow("acme", "acme_events", f"r{i:02d}", f"e{i}", 1772359200000000, orjson.dumps(cols),
                    orjson.dumps(TYPES))


def _counter(result, name: str) -> int:
    found = result.metrics().query(MetricsFilter().with_namespace("headwater").with_name(name))["counters"]
    return sum(c.committed if c.committed is not None else c.attempted for c in found)


@pytest.mark.parametrize("method", ["streaming_inserts", "file_loads"])
def test_faults_bounded_retries_poison_isolated_exactly_once(cloud_services, method):
    scheduled, schedule = SCHEDULES[method]
    dataset = unique_id("hw_fault")
    with FaultProxy(cloud_services.bigquery, poison=rb'"note":\s*"POISON"', scheduled=scheduled,
                    schedule=tuple(schedule), stall_s=3.0) as proxy:
        wh = WarehouseSpec(kind="bigquery", project="headwater-local", dataset=dataset, endpoint=proxy.url,
                           bigquery={"method": method, "max_attempts": 4, "initial_backoff_s": 0.05,
                                     "max_backoff_s": 0.2, "request_timeout_s": 2, "insert_batch_rows": 8,
                                     "load_batch_rows": 8})
        t0 = time.monotonic()
        p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
        _ = ({"rows": p | "Rows" >> beam.Create([_row(i) for i in range(N)]),
              "aggregates": p | "Aggs" >> beam.Create([]), "dead_letters": p | "Dead" >> beam.Create([])}
             | "WriteBigQuery" >> WriteToBigQueryWarehouse(wh, {"acme": TableSpec(name="acme_events")}))
        result = p.run()
        result.wait_until_finish()
        elapsed = time.monotonic() - t0
        log = list(proxy.log)
        left = list(proxy.schedule)
    assert elapsed < 240, f"the write took {elapsed:.0f}s: a fault made it hang"
    assert left == [], f"not every scheduled fault was hit: {left} (log: {log})"
    injected = sum(1 for _, _, o in log if o in TRANSIENT)
    assert injected == sum(1 for a in schedule if a.partition("@")[0] in TRANSIENT)
    # a write was committed upstream but its response lost: the retry was recognised as a repeat (the same
    # job id -> 409 -> the existing job's outcome; the same insertIds -> de-duplicated), not written twice
    assert any(o == "reset_after" and ("insertAll" in p or m == "PUT") for m, p, o in log)
    assert any(o == "job_exists_409" if method == "file_loads" else o.startswith("dedup_") for _, _, o in log)
    # read back directly from the emulator (no proxy)
    client = make_client(WarehouseSpec(kind="bigquery", project="headwater-local", dataset=dataset,
                                       endpoint=cloud_services.bigquery))
    ref = f"headwater-local.{dataset}"
    got = [r["_row_id"] for r in client.query(f"SELECT _row_id FROM `{ref}.acme_events` ORDER BY _row_id").result(retry=None)]
    assert got == [f"r{i:02d}" for i in range(N) if i != POISON], "every good row exactly once"
    dead = [(r["coords"], r["reason"], r["error_class"]) for r in client.query(
        f"SELECT coords, reason, error_class FROM `{ref}.dead_letters`").result(retry=None)]
    assert dead == [(f"bigquery:acme_events/r{POISON:02d}", "sink_rejected", "BadRequest")]
    poison_requests = sum(1 for _, _, o in log if o == "poison_400")
    assert 1 <= poison_requests <= 4, poison_requests  # bisection: O(log batch) requests carry the poison row
    # counters: rows written, the one rejection, one retry per injected transient fault
    assert _counter(result, "bigquery_rows_written") == N - 1
    assert _counter(result, "dead_letters_bigquery") == 1
    assert _counter(result, "bigquery_transient_retries") == injected
    assert isinstance(client, bigquery.Client)
