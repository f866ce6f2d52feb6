"""The streaming sources report their backlog as the restriction size (Dataflow's autoscaler reads it)."""
from __future__ import annotations

import orjson
import pytest
from apache_beam.io.restriction_trackers import OffsetRange

from ingest.contract import KafkaSource
from ingest.kafka_source import (END_OF_TIME_OFFSET, KafkaPartition, _consumer, _PartitionRestrictions,
                                 backlog_records, note_end_offset)
from ingest.pubsub_source import pull_backlog
from tests.ingest.conftest import unique_name


def test_kafka_backlog_is_end_offset_minus_position():
    assert backlog_records(None, 5) == 1.0  # never read here: unknown, every partition weighs the same
    assert backlog_records(100, 30) == 70.0
    assert backlog_records(100, 100) == 0.0
    assert backlog_records(10, 20) == 0.0  # position past a stale end offset: nothing known to be left


def test_pubsub_backlog_lower_bound_from_full_pulls():
    assert pull_backlog([]) == 0.0
    assert pull_backlog([500, 500, 120]) == 0.0  # the last pull came back short: drained
    assert pull_backlog([500, 500], 500) == 1000.0  # full pulls until the read's time ran out: at least that much
    assert pull_backlog([30, 500], 500) == 500.0


@pytest.mark.integration
def test_kafka_restriction_size_is_the_real_backlog(live_services):
    """Against the broker: after reading 20 of 50 records the residual restriction weighs 30."""
    from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic

    bootstrap = live_services.kafka_bootstrap
    topic = unique_name("backlog")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in range(50):
        producer.send(topic, value=orjson.dumps({"i": i}))
    producer.flush()
    producer.close()
    spec = KafkaSource(kind="kafka", bootstrap_servers=bootstrap, topics=(topic,), group_id=unique_name("g"))
    reader = _consumer(spec, None, "backlog-test")
    tp = TopicPartition(topic, 0)
    reader.assign([tp])
    reader.seek(tp, 0)
    got = []
    for _ in range(50):
        got += reader.poll(timeout_ms=500, max_records=20).get(tp, [])
        if got:
            break
    note_end_offset(reader, tp)  # what ReadPartitions does after its polls
    reader.close()
    assert got, "nothing read from the broker"
    position = got[-1].offset + 1
    size = _PartitionRestrictions().restriction_size(KafkaPartition(topic, 0, 0), OffsetRange(position, END_OF_TIME_OFFSET))
    assert size == 50 - position and 0 < size < 50
