"""The whole headwater job built for Dataflow (--dry_run, offline): the job graph holds the BigQuery write
with its time partitioning and clustering. No network: --dry_run stops before any API call."""
from __future__ import annotations

import apache_beam as beam
import orjson
import pytest
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.internal import apiclient

from ingest.contract import parse_contract
from ingest.pipeline import build, pipeline_options

DATAFLOW_ARGV = ["--runner=DataflowRunner", "--dry_run=True", "--project=test-project", "--region=us-central1",
                 "--temp_location=gs://headwater-test/tmp", "--staging_location=gs://headwater-test/staging",
                 "--sdk_location=container", "--no_auth", "--job_name=headwater-dryrun"]


def _contract(source: dict):
    return parse_contract({
        "warehouse": {"kind": "bigquery", "project": "test-project", "dataset": "headwater"},
        "partners": [{"name": "acme", "sources": [source],
                      "table": {"name": "acme_events", "partition_granularity": "HOUR",
                                "clustering": ["_user_id", "country"]}}]})


def _dry_run(contract):
    p = beam.Pipeline(options=pipeline_options(contract, DATAFLOW_ARGV))
    build(p, contract)
    return p.run().job


def _display(job, suffix: str) -> dict:
    for t in job.proto_pipeline.components.transforms.values():
        if t.unique_name.startswith("WriteWarehouse/BigQuery/") and t.unique_name.endswith(suffix) \
                and t.spec.urn == "beam:transform:pardo:v1" and "_WriteBatchFn" in str(t.display_data):
            items = (beam_runner_api_pb2.LabelledPayload.FromString(d.payload) for d in t.display_data)
            return {i.key: i.string_value for i in items}
    raise AssertionError(f"no BigQuery write step ending {suffix!r} in the job graph")


@pytest.mark.parametrize("source,method,job_type", [
    ({"kind": "file", "pattern": "gs://acme-drop/events/*.jsonl.gz"}, "file_loads",
     apiclient.dataflow.JobType.JOB_TYPE_BATCH),
    ({"kind": "pubsub", "subscription": "projects/test-project/subscriptions/acme-events"}, "streaming_inserts",
     apiclient.dataflow.JobType.JOB_TYPE_STREAMING),
])
def test_dataflow_dry_run_graph_has_bigquery_write_with_partitioning_and_clustering(source, method, job_type):
    job = _dry_run(_contract(source))
    assert job.proto.type == job_type
    rows = _display(job, "WriteRows/ParDo(_WriteBatchFn)")
    assert rows["bigquery_tables"] == "test-project:headwater.acme_events"
    assert rows["bigquery_method"] == method
    params = orjson.loads(rows["table_parameters"])
    assert params == {"acme_events": {"timePartitioning": {"type": "HOUR", "field": "_event_time"},
                                      "clustering": {"fields": ["_user_id", "country"]}}}
    assert rows["time_partitioning"] == "acme_events=HOUR(_event_time)"
    assert rows["clustering"] == "acme_events=_user_id,country"
    dl = _display(job, "WriteDeadLetters")
    assert orjson.loads(dl["table_parameters"]) == {"dead_letters": {
        "timePartitioning": {"type": "DAY", "field": "timestamp"}, "clustering": {"fields": ["partner", "reason"]}}}
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    assert {"WriteWarehouse/BigQuery/WriteRows", "WriteWarehouse/BigQuery/WriteAggregates",
            "WriteWarehouse/BigQuery/WriteDeadLetters"} <= names
