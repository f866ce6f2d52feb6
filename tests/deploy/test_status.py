"""The status line of a streaming `headwater run` (issue 10, item 8): formatting, collection, TTY-only drawing,
the same numbers as the job's Beam metrics, and Kafka lag per partition against the real local broker."""
from __future__ import annotations

import io
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline

from deploy.cli import _start_status
from deploy.status import KafkaLag, Snapshot, StatusLine, collect, format_status
from flatten import live
from ingest.contract import parse_contract
from ingest.pipeline import build
from tests.conftest_services import live_services, unique_name  # noqa: F401  (fixture)
from tests.sinks.test_warehouse_reader import _overrides, contract_for, events


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_status_line():
    a = Snapshot(10.0, 1000, 900, 40, 3, 2, 120, None)
    b = Snapshot(20.0, 13_345, 12_300, 410, 12, 3, 300, {"offers/0": 12, "offers/1": 0, "offers/2": 3})
    assert format_status(a, b) == ("events 13,345 in (1,234/s) · rows 12,300 written · aggregates 410 · "
                                   "dead letters 12 · duplicates 3 · state keys 300 · "
                                   "kafka lag 15 (offers/0 12, offers/2 3)")
    assert format_status(None, a) == ("events 1,000 in · rows 900 written · aggregates 40 · dead letters 3 · "
                                      "duplicates 2 · state keys 120")
    assert format_status(None, b._replace(kafka_lag={"t/0": 0, "t/1": 0})).endswith("kafka lag 0 (2 partitions)")


def test_collect_reads_the_live_counters():
    live.reset()
    for name, n in [("events_in", 7), ("rows_written", 5), ("aggregates_written", 2), ("dead_letters_written", 1),
                    ("duplicates", 1), ("state_keys_created", 4), ("state_keys_expired", 1)]:
        live.inc(name, n)
    assert collect(1.0) == Snapshot(1.0, 7, 5, 2, 1, 1, 3, None)
    live.reset()


def test_nothing_is_printed_when_stdout_is_not_a_tty(monkeypatch):
    out = io.StringIO()
    line = StatusLine(0.5, out=out)
    assert line.start() is False
    time.sleep(1.0)
    line.stop()
    assert out.getvalue() == ""
    streaming = parse_contract({"partners": [{"name": "kp", "table": {"name": "k_events"}, "sources": [
        {"kind": "kafka", "topics": ["t"], "group_id": "g"}]}]})
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert _start_status(streaming, 10.0) is None
    monkeypatch.setattr(sys, "stdout", _Tty())
    assert _start_status(streaming, 0) is None  # --status-every 0: off


def test_on_a_terminal_the_line_is_drawn_and_keeps_the_last_figures():
    live.reset()
    out = _Tty()
    line = StatusLine(0.5, out=out, kafka_lag=lambda: {"t/0": 4})
    assert line.start() is True
    live.inc("events_in", 5)
    live.inc("rows_written", 3)
    deadline = time.monotonic() + 20
    while "events 5 in" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.1)
    live.inc("events_in", 2)
    line.stop()
    text = out.getvalue()
    assert "rows 3 written" in text and "kafka lag 4 (t/0 4)" in text
    assert "events 7 in" in text  # stop() draws the final figures
    live.reset()


def _counter(result, name: str) -> int:
    found = result.metrics().query(MetricsFilter().with_namespace("headwater").with_name(name))["counters"]
    return sum(c.committed or c.attempted or 0 for c in found)


def test_the_live_figures_are_the_jobs_beam_metrics(tmp_path):
    """Same increments: the job's Beam counters (namespace headwater) equal what the status line reads."""
    contract = contract_for({"kind": "duckdb", "path": str(tmp_path / "wh.duckdb")})
    evs = events(60)
    evs.append(dict(evs[3]))  # a duplicate event id: dropped by DropDuplicateEvents
    live.reset()
    p = TestPipeline(runner="FnApiRunner")
    build(p, contract, source_overrides=_overrides(evs), require_overrides=True)
    result = p.run()
    result.wait_until_finish()
    snap = collect(0.0)
    assert snap.events_in == _counter(result, "events_parsed") + _counter(result, "dead_letters_parse") == 2 * 61
    assert snap.duplicates == _counter(result, "duplicate_events") == 2
    assert snap.rows_written == _counter(result, "warehouse_rows_written") > 100
    assert snap.aggregates_written == _counter(result, "warehouse_aggregates_written") > 0
    assert snap.dead_letters == (_counter(result, "warehouse_dead_letters_written")
                                 + _counter(result, "dead_letters_warehouse")) >= 1
    live.reset()


def test_state_keys_count_created_minus_expired():
    from state.spec import AggregateSpec, MetricSpec
    from state.transform import ComputeAggregates
    from tests.state.streamkit import MIN, bounded, inp

    spec = AggregateSpec(name="activity", metrics=[MetricSpec(name="n", fn="count")], ttl="2h")
    live.reset()
    p = TestPipeline(runner="FnApiRunner")
    _ = bounded(p, [inp(f"u{i % 7}", i * MIN, i) for i in range(30)]) | "Agg" >> ComputeAggregates(
        {("p", "activity"): spec}, fold_bounded=False)
    result = p.run()
    result.wait_until_finish()
    assert live.value("state_keys_created") == _counter(result, "state_keys_created") == 7
    assert live.value("state_keys_expired") == _counter(result, "state_keys_expired") == 7  # TTL at the end
    assert collect(0.0).state_keys == 0
    live.reset()


@pytest.mark.integration
def test_kafka_lag_per_partition_on_the_real_broker(live_services):
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.structs import OffsetAndMetadata

    topic, group = unique_name("hw-status"), unique_name("hw-status-g")
    admin = KafkaAdminClient(bootstrap_servers=[live_services.kafka_bootstrap], client_id="test-status")
    admin.create_topics([NewTopic(topic, 2, 1)])
    admin.close()
    prod = KafkaProducer(bootstrap_servers=[live_services.kafka_bootstrap])
    for part, n in ((0, 3), (1, 1)):
        for _ in range(n):
            prod.send(topic, b"x", partition=part)
    prod.flush()
    prod.close()
    contract = parse_contract({"partners": [{"name": "kp", "table": {"name": "k_events"}, "sources": [
        {"kind": "kafka", "bootstrap_servers": live_services.kafka_bootstrap, "topics": [topic], "group_id": group}]}]})
    lag = KafkaLag(contract)
    try:
        assert lag() == {f"{topic}/0": 3, f"{topic}/1": 1}  # nothing committed yet
        c = KafkaConsumer(bootstrap_servers=[live_services.kafka_bootstrap], group_id=group, enable_auto_commit=False)
        c.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, "", -1)})
        c.close()
        assert lag() == {f"{topic}/0": 1, f"{topic}/1": 1}
    finally:
        lag.close()
