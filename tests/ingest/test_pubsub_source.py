"""ReadFromPartnerPubSub: pure helpers, runner choice, and against the real Pub/Sub emulator on Prism."""
from __future__ import annotations

import os

from datetime import datetime, timezone

import apache_beam as beam
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from ingest.contract import PubSubSource
from ingest.pubsub_source import ReadFromPartnerPubSub, attribute_timestamp_us, pubsub_raw_message
from ingest.runner import PrismNotFound, runner_options, uses_native_pubsub
from tests.ingest.conftest import AppendJsonl, pubsub_backlog, read_jsonl, run_streaming, unique_name

# -- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("1700000000123", 1_700_000_000_123_000),
    ("2026-01-01T00:00:01.5Z", 1_767_225_601_500_000),
    ("2026-01-01T01:00:00+01:00", 1_767_225_600_000_000),
    ("yesterday", None), ("", None), (None, None), ("2026-01-01T00:00:00", None),  # no zone: unusable
])
def test_timestamp_attribute_parsing(value, expected):
    assert attribute_timestamp_us(value) == expected


def test_message_becomes_raw_message():
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    msg = pubsub_raw_message("acme", "projects/p1/subscriptions/s1", "42", b"{}", {"b": "2", "a": "1"}, when)
    assert msg.coords == "pubsub:projects/p1/subscriptions/s1#42"
    assert msg.attributes == b'{"a":"1","b":"2"}'
    assert (msg.source, msg.source_time_us) == ("pubsub", 1_767_225_600_000_000)


@pytest.mark.parametrize("argv,native", [
    ([], True),  # Beam's default runner is the DirectRunner
    (["--runner=DirectRunner"], True),
    (["--runner=DataflowRunner"], True),
    (["--runner=PrismRunner"], False),
    (["--runner=FlinkRunner"], False),
])
def test_native_read_only_where_it_runs(argv, native):
    assert uses_native_pubsub(PipelineOptions(argv)) is native


def test_runner_options_pick_prism_for_streaming_only():
    assert runner_options(False, ["--foo=1"]) == ["--foo=1"]
    argv = runner_options(True, ["--foo=1"], prism="/opt/prism")
    assert argv[0] == "--runner=PrismRunner" and argv[1].startswith("--prism_location=")
    supervisor = argv[1].split("=", 1)[1]  # Prism runs under headwater's supervisor (never outlives the job)
    assert "PRISM = '/opt/prism'" in open(supervisor).read() and os.access(supervisor, os.X_OK)
    # splits of stateful bundles lose state updates on Prism 2.77 (docs/streaming.md): always disabled
    assert argv[2:5] == ["--environment_type=LOOPBACK", "--experiments=prism_disable_sdf_split", "--streaming"]
    assert argv[-1] == "--foo=1"
    assert runner_options(True, ["--experiments=prism_disable_sdf_split,x"], prism="/opt/prism").count(
        "--experiments=prism_disable_sdf_split") == 0
    dataflow = runner_options(True, ["--runner=DataflowRunner", "--project=p"], prism="/opt/prism")
    assert dataflow == ["--streaming", "--runner=DataflowRunner", "--project=p"]
    kept = runner_options(True, ["--prism_location", "/x/prism"], prism="/opt/prism")
    assert "--prism_location=/opt/prism" not in kept


def test_runner_options_explain_a_missing_prism(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADWATER_LOCAL", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("HEADWATER_PRISM", raising=False)
    with pytest.raises(PrismNotFound, match="install_prism.sh"):
        runner_options(True, [])


# -- against the emulator ------------------------------------------------------------------------


def _topic_and_subscription(ack_deadline: int = 10) -> tuple[str, str]:
    from google.cloud import pubsub_v1

    topic = f"projects/test-project/topics/{unique_name('hw-t')}"
    sub = f"projects/test-project/subscriptions/{unique_name('hw-s')}"
    pubsub_v1.PublisherClient().create_topic(request={"name": topic})
    client = pubsub_v1.SubscriberClient()
    client.create_subscription(request={"name": sub, "topic": topic, "ack_deadline_seconds": ack_deadline})
    client.close()
    return topic, sub


def _publish(topic: str, n: int, start: int = 0) -> list[str]:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    futures = [publisher.publish(topic, orjson.dumps({"i": i}), event_ts=f"2026-01-01T00:00:{i % 60:02d}Z",
                                 event_id=f"e-{i}") for i in range(start, start + n)]
    return [f.result(timeout=30) for f in futures]


@pytest.mark.integration
def test_pull_read_on_prism_keeps_attributes_ids_times_and_acks(live_services, tmp_path):
    topic, sub = _topic_and_subscription()
    ids = _publish(topic, 25)
    spec = PubSubSource(kind="pubsub", subscription=sub, topic=topic, timestamp_attribute="event_ts",
                        id_attribute="event_id")
    out = tmp_path / "out.jsonl"

    def build(p):
        _ = p | "PubSub" >> ReadFromPartnerPubSub(spec, "acme") | "Collect" >> beam.ParDo(AppendJsonl(str(out)))

    reached, state = run_streaming(build, lambda: len(read_jsonl(out)) >= 25)
    assert reached and state == "CANCELLED"
    got = read_jsonl(out)
    assert sorted(r["coords"] for r in got) == sorted(f"pubsub:{sub}#{i}" for i in ids)
    for r in got:
        i = orjson.loads(r["payload"])["i"]
        assert r["attributes"] == {"event_ts": f"2026-01-01T00:00:{i % 60:02d}Z", "event_id": f"e-{i}"}
        assert r["ts_us"] == attribute_timestamp_us(r["attributes"]["event_ts"])  # timestamp_attribute
        assert r["source_time_us"] > r["ts_us"]  # publish time recorded separately (it is "now")
    assert pubsub_backlog(sub) == 0  # every message was acked after its bundle was finalized


@pytest.mark.integration
def test_native_read_on_direct_runner(live_services, tmp_path):
    """The DirectRunner path uses Beam's ReadFromPubSub (as Dataflow does) and yields the same RawMessages."""
    import time

    topic, sub = _topic_and_subscription()
    ids = _publish(topic, 5)
    spec = PubSubSource(kind="pubsub", subscription=sub, topic=topic, timestamp_attribute="event_ts")
    out = tmp_path / "out.jsonl"
    p = beam.Pipeline(options=PipelineOptions(["--runner=BundleBasedDirectRunner", "--streaming"]))
    _ = p | "PubSub" >> ReadFromPartnerPubSub(spec, "acme") | "Collect" >> beam.ParDo(AppendJsonl(str(out)))
    result = p.run()  # the bundle-based DirectRunner runs streaming jobs on background threads
    deadline = time.monotonic() + 60
    while len(read_jsonl(out)) < 5 and time.monotonic() < deadline:
        time.sleep(0.5)
    result.cancel()
    got = read_jsonl(out)
    assert sorted(r["coords"] for r in got) == sorted(f"pubsub:{sub}#{i}" for i in ids)
    assert all(r["ts_us"] == attribute_timestamp_us(r["attributes"]["event_ts"]) for r in got)
    assert all(r["source_time_us"] > 0 for r in got)


@pytest.mark.integration
def test_a_vanished_subscription_is_said_plainly_once_then_recovers(live_services, caplog):
    """Issue 14: an emulator restart forgets its subscriptions; the read must say so in plain words (once per
    outage, not a stream of client errors), keep polling without a crash, and say when it works again."""
    import logging

    from google.cloud import pubsub_v1

    from ingest.pubsub_source import _PullFn

    topic = f"projects/test-project/topics/{unique_name('hw-t')}"
    sub = f"projects/test-project/subscriptions/{unique_name('hw-s')}"
    fn = _PullFn(PubSubSource(kind="pubsub", subscription=sub, topic=topic), "acme")
    fn.setup()
    try:
        with caplog.at_level(logging.WARNING, logger="ingest.pubsub_source"):
            assert fn._pull(sub) == [] and fn._pull(sub) == [] and fn._pull(sub) == []
            vanished = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
            assert len(vanished) == 1, caplog.text
            assert sub in vanished[0] and "acme" in vanished[0] and "emulator restarted" in vanished[0]
            pubsub_v1.PublisherClient().create_topic(request={"name": topic})
            client = pubsub_v1.SubscriberClient()
            client.create_subscription(request={"name": sub, "topic": topic})
            client.close()
            fn._pull(sub)
            assert any("works again" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        fn.teardown()
