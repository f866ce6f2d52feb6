"""ReadFromKafkaPy: pure helpers, and against a real Kafka 4.x broker on the local runner (Prism)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from apache_beam.io.restriction_trackers import OffsetRange

from ingest.contract import KafkaSource
from ingest.kafka_source import KEY_ATTRIBUTE, ReadFromKafkaPy, _NoDynamicSplitTracker, kafka_attributes, to_raw_message
from tests.ingest.conftest import AppendJsonl, read_jsonl, run_streaming, unique_name

import apache_beam as beam

# -- pure ----------------------------------------------------------------------------------------


def test_attributes_keep_headers_and_key_and_survive_binary():
    attrs = orjson.loads(kafka_attributes(b"user-1", [("trace", b"abc"), ("bin", b"\xff\x00")]))
    assert attrs == {"trace": "abc", "bin": "base64:/wA=", KEY_ATTRIBUTE: "user-1"}
    assert orjson.loads(kafka_attributes(None, None)) == {}


def test_record_becomes_raw_message_with_coordinates():
    rec = SimpleNamespace(topic="orders", partition=3, offset=1200, value=b'{"a":1}', key=None,
                          headers=[], timestamp=1_700_000_000_123)
    msg = to_raw_message("acme", rec)
    assert msg.coords == "kafka:orders/3@1200"
    assert (msg.partner, msg.source, msg.payload, msg.source_time_us) == ("acme", "kafka", b'{"a":1}',
                                                                           1_700_000_000_123_000)


def test_record_batch_checksums_are_checked_in_c_with_the_same_result():
    """kafka-python's pure-Python CRC-32C is replaced (issue 13): same checksum, and a corrupted batch is
    still refused when records are read."""
    import os

    from kafka.record import default_records
    from kafka.record._crc32c import crc as python_crc
    from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

    from ingest.kafka_source import native_crc32c

    assert native_crc32c()
    assert getattr(default_records.calc_crc32c, "headwater", False)
    for n in (0, 1, 7, 4096, 100_003):
        data = os.urandom(n)
        assert default_records.calc_crc32c(memoryview(data)[3:]) == python_crc(memoryview(data)[3:])
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i in range(50):
        builder.append(i, timestamp=1_780_000_000_000 + i, key=None, value=b"v%d" % i, headers=[])
    buf = bytearray(builder.build())
    assert DefaultRecordBatch(bytes(buf)).validate_crc()
    buf[-1] ^= 0xFF  # a flipped bit in the last record
    assert not DefaultRecordBatch(bytes(buf)).validate_crc()


def test_tracker_refuses_dynamic_splits_but_checkpoints():
    t = _NoDynamicSplitTracker(OffsetRange(10, 2**63 - 1))
    assert t.try_claim(10)
    assert t.try_split(0.5) is None
    primary, residual = t.try_split(0)
    assert (primary.stop, residual.start) == (11, 11)


def test_bad_start_timestamp_fails_at_construction():
    spec = KafkaSource(kind="kafka", topics=("t1",), group_id="g", start="timestamp:yesterday")
    with pytest.raises(ValueError, match="partner 'acme'.*timestamp:yesterday"):
        ReadFromKafkaPy(spec, "acme")


# -- against a real broker -----------------------------------------------------------------------


def _produce(bootstrap: str, topic: str, n: int, start: int = 0, partitions: int = 4) -> None:
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    if topic not in admin.list_topics():
        admin.create_topics([NewTopic(topic, partitions, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in range(start, start + n):
        producer.send(topic, key=f"user-{i % 7}".encode(), value=orjson.dumps({"i": i}),
                      headers=[("event_id", f"e-{i}".encode())])
    producer.flush()
    producer.close()


def _committed(bootstrap: str, group: str, topic: str, partitions: int = 4) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)}
    finally:
        c.close()


def _read(spec: KafkaSource, out: Path, until, timeout: float = 60.0) -> tuple[bool, str]:
    def build(p):
        _ = (p | "Kafka" >> ReadFromKafkaPy(spec, "acme")
             | "Collect" >> beam.ParDo(AppendJsonl(str(out))))
    return run_streaming(build, until, timeout)


@pytest.mark.integration
def test_reads_every_partition_and_commits_after_finalization(live_services, tmp_path):
    topic, group = unique_name("hw-k"), unique_name("g")
    _produce(live_services.kafka_bootstrap, topic, 40)
    spec = KafkaSource(kind="kafka", bootstrap_servers=live_services.kafka_bootstrap, topics=(topic,),
                       group_id=group, start="committed")
    out = tmp_path / "out.jsonl"
    # Wait for the rows *and* the commits: commits happen in the bundle finalizer, after the output.
    reached, state = _read(spec, out, lambda: len(read_jsonl(out)) >= 40
                           and sum(_committed(live_services.kafka_bootstrap, group, topic).values()) == 40)
    assert reached and state == "CANCELLED"
    got = read_jsonl(out)
    assert len(got) == 40
    assert {int(r["coords"].split("/")[1].split("@")[0]) for r in got} == {0, 1, 2, 3}  # all partitions
    assert sorted(orjson.loads(r["payload"])["i"] for r in got) == list(range(40))
    for r in got:
        assert r["source"] == "kafka" and r["coords"].startswith(f"kafka:{topic}/")
        i = orjson.loads(r["payload"])["i"]
        assert r["attributes"] == {"event_id": f"e-{i}", KEY_ATTRIBUTE: f"user-{i % 7}"}
        assert r["ts_us"] == r["source_time_us"] > 0  # element timestamp = record timestamp


@pytest.mark.integration
def test_restart_resumes_from_committed_offsets(live_services, tmp_path):
    topic, group = unique_name("hw-k"), unique_name("g")
    bootstrap = live_services.kafka_bootstrap
    spec = KafkaSource(kind="kafka", bootstrap_servers=bootstrap, topics=(topic,), group_id=group)
    _produce(bootstrap, topic, 20)
    first = tmp_path / "first.jsonl"
    reached, _ = _read(spec, first, lambda: sum(_committed(bootstrap, group, topic).values()) == 20)
    assert reached
    _produce(bootstrap, topic, 20, start=20)
    second = tmp_path / "second.jsonl"
    reached, _ = _read(spec, second, lambda: sum(_committed(bootstrap, group, topic).values()) == 40)
    assert reached
    seen_second = sorted(orjson.loads(r["payload"])["i"] for r in read_jsonl(second))
    assert seen_second == list(range(20, 40))  # resumed after the commits: nothing lost, nothing replayed


@pytest.mark.integration
def test_start_latest_skips_the_backlog(live_services, tmp_path):
    topic, group = unique_name("hw-k"), unique_name("g")
    bootstrap = live_services.kafka_bootstrap
    _produce(bootstrap, topic, 10)
    spec = KafkaSource(kind="kafka", bootstrap_servers=bootstrap, topics=(topic,), group_id=group, start="latest")
    out = tmp_path / "out.jsonl"

    def build(p):
        _ = p | "Kafka" >> ReadFromKafkaPy(spec, "acme") | "Collect" >> beam.ParDo(AppendJsonl(str(out)))

    import threading

    stop = threading.Event()

    def trickle():  # new records keep arriving, so some land after the reader positioned itself at 'latest'
        n = 100
        while not stop.is_set():
            _produce(bootstrap, topic, 1, start=n)
            n += 1
            stop.wait(0.5)

    producer = threading.Thread(target=trickle, daemon=True)
    producer.start()
    try:
        reached, _ = run_streaming(build, lambda: len(read_jsonl(out)) >= 5, timeout=60)
    finally:
        stop.set()
        producer.join()
    assert reached
    seen = [orjson.loads(r["payload"])["i"] for r in read_jsonl(out)]
    assert min(seen) >= 100  # the 10 records of the backlog were never read


def test_a_reader_that_cannot_reach_the_broker_defers_instead_of_failing_the_bundle(caplog):
    """The SDK makes a new instance of the read DoFn per concurrent bundle; one made while the broker is
    down must retry its partition later (as if idle), not fail the bundle (Prism fails the job then).
    The broker here is a port nothing listens on: a real refused connection."""
    import logging
    import socket

    from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator

    from ingest import kafka_source
    from ingest.kafka_source import KafkaPartition, _ReadPartitionFn

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    spec = KafkaSource(kind="kafka", bootstrap_servers=f"127.0.0.1:{port}", topics=["t"], group_id="g")
    fn = _ReadPartitionFn(spec, "p", mode="ledger")
    fn.setup()
    registered = []
    fin = SimpleNamespace(register=registered.append)
    tracker = ThreadsafeRestrictionTracker(_NoDynamicSplitTracker(OffsetRange(7, 2**63 - 1)))
    view = RestrictionTrackerView(tracker)
    try:
        with caplog.at_level(logging.WARNING):
            out = list(fn.process(KafkaPartition("t", 0, 7), fin=fin, tracker=view,
                                  watermark=ManualWatermarkEstimator(None)))
    finally:
        fn.teardown()
        kafka_source._NOISE.reachable()
    assert out == []
    assert len(registered) == 1
    deferred = tracker.deferred_status()
    assert deferred is not None, "the restriction must be deferred (retried later)"
    residual, delay = deferred
    assert residual.start == 7, "nothing claimed: the residual starts where it did"
    assert delay.micros > 0
    assert "the broker is unreachable" in caplog.text
