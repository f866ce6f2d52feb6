"""``headwater publish``: send realistic events to a partner's live source (Pub/Sub topic or Kafka topic).

    publish(contract, "acme_bank", rate=50, count=1000, seed=0) -> number of events sent

Events are the synthetic nested documents of ``deploy.synth`` with the
partner's envelope fields (event id, user id, event time) written where the
contract says they live: a payload path, or ``attribute:<name>`` (a Pub/Sub
attribute or Kafka header). Event ids are ``<partner>-<seed>-<n>``, so
publishing the same seed twice sends the same events (the pipeline dedups
them) and a new seed sends new ones. Event times are "now".

Local servers: with ``PUBSUB_EMULATOR_HOST`` set the topic and subscription
are created on the emulator when missing (ack deadline ``ACK_DEADLINE_S``);
Kafka topics are created with ``KAFKA_PARTITIONS`` partitions when missing.
"""
from __future__ import annotations

import os
import random
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional

import orjson

from deploy.synth import acme_event, orbit_event
from ingest.contract import Contract, ContractError, KafkaSource, PartnerContract, PubSubSource

__all__ = ["publish", "send_payloads", "make_event", "ensure_pubsub", "ensure_kafka_topic",
           "ACK_DEADLINE_S", "KAFKA_PARTITIONS"]

ACK_DEADLINE_S = 20
KAFKA_PARTITIONS = 4


def _put(doc: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = doc
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _time_value(fmt: str, when: datetime) -> Any:
    if fmt == "epoch_s":
        return int(when.timestamp())
    if fmt == "epoch_ms":
        return int(when.timestamp() * 1000)
    if fmt == "epoch_us":
        return int(when.timestamp() * 1_000_000)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(partner: PartnerContract, i: int, rng: random.Random, seed: int = 0,
               now: Optional[datetime] = None) -> tuple[bytes, dict[str, str]]:
    """One realistic event for ``partner``: (payload, attributes). Deterministic for (seed, i) except the time."""
    env = partner.envelope
    doc = orbit_event(i, rng) if env.event_id == "offer_event_id" else acme_event(i, rng)
    when = now or datetime.now(timezone.utc)
    event_id = f"{partner.name}-{seed}-{i:08d}"
    user_id = f"user-{rng.randrange(200):05d}"
    attrs: dict[str, str] = {}
    for locator, value in ((env.event_id, event_id), (env.user_id, user_id),
                           (env.event_time, _time_value(env.event_time_format, when))):
        if locator.startswith("attribute:"):
            attrs[locator.split(":", 1)[1]] = str(value)
        else:
            _put(doc, locator, value)
    for spec in partner.sources:
        if isinstance(spec, PubSubSource):
            if spec.timestamp_attribute:
                attrs[spec.timestamp_attribute] = str(int(when.timestamp() * 1000))
            if spec.id_attribute:
                attrs[spec.id_attribute] = event_id
    return orjson.dumps(doc), attrs


def _live_source(partner: PartnerContract) -> PubSubSource | KafkaSource:
    for spec in partner.sources:
        if isinstance(spec, (PubSubSource, KafkaSource)):
            return spec
    raise ContractError(f"partner {partner.name!r} has no pubsub or kafka source to publish to")


def ensure_pubsub(spec: PubSubSource, partner: str) -> None:
    """On the emulator (PUBSUB_EMULATOR_HOST set), create the topic and subscription when missing."""
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    if not spec.topic:
        raise ContractError(f"partner {partner!r}: sources[pubsub].topic is needed to publish")
    if not os.environ.get("PUBSUB_EMULATOR_HOST"):
        return
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    try:
        try:
            publisher.create_topic(request={"name": spec.topic})
        except exceptions.AlreadyExists:
            pass
        try:
            subscriber.create_subscription(request={"name": spec.subscription, "topic": spec.topic,
                                                    "ack_deadline_seconds": ACK_DEADLINE_S})
        except exceptions.AlreadyExists:
            pass
    finally:
        subscriber.close()


def ensure_kafka_topic(spec: KafkaSource, partner: str) -> str:
    """The topic to publish to (the first of ``topics``), created when missing."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    if not spec.topics:
        raise ContractError(f"partner {partner!r}: kafka topic_pattern cannot be published to; name a topic in 'topics'")
    topic = spec.topics[0]
    admin = KafkaAdminClient(bootstrap_servers=spec.bootstrap_servers.split(","), client_id="headwater-publish")
    try:
        if topic not in admin.list_topics():
            try:
                admin.create_topics([NewTopic(topic, KAFKA_PARTITIONS, 1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return topic


class _Pacer:
    def __init__(self, rate: float):
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = time.monotonic()

    def wait(self) -> None:
        if not self._interval:
            return
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next = max(self._next + self._interval, time.monotonic() - 1.0)


def send_payloads(contract: Contract, partner_name: str, messages: Iterable[tuple[bytes, Mapping[str, str]]],
                  rate: float = 0.0, key_attribute: Optional[str] = None) -> int:
    """Send (payload, attributes) pairs to the partner's live source; returns how many were sent.

    Pub/Sub: attributes become message attributes. Kafka: attributes become
    headers and ``key_attribute``'s value (default: none) the record key.
    Raw payloads may be anything (tests send malformed ones this way).
    """
    partner = contract.partner(partner_name)
    spec = _live_source(partner)
    pacer = _Pacer(rate)
    sent = 0
    if isinstance(spec, PubSubSource):
        from google.cloud import pubsub_v1

        ensure_pubsub(spec, partner.name)
        publisher = pubsub_v1.PublisherClient()
        futures = []
        for payload, attrs in messages:
            pacer.wait()
            futures.append(publisher.publish(spec.topic, payload, **dict(attrs)))
            sent += 1
        for f in futures:
            f.result(timeout=60)
        return sent
    from kafka import KafkaProducer

    topic = ensure_kafka_topic(spec, partner.name)
    producer = KafkaProducer(bootstrap_servers=spec.bootstrap_servers.split(","), acks="all", linger_ms=5,
                             client_id="headwater-publish")
    try:
        for payload, attrs in messages:
            pacer.wait()
            key = attrs.get(key_attribute).encode() if key_attribute and attrs.get(key_attribute) else None
            producer.send(topic, value=payload, key=key, headers=[(k, v.encode()) for k, v in attrs.items()])
            sent += 1
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)
    return sent


def publish(contract: Contract, partner_name: str, rate: float, count: int, seed: int = 0) -> int:
    """Send ``count`` realistic events at about ``rate`` per second (<= 0: as fast as possible).

    Returns the number sent. Kafka records are keyed by user id (one user's
    events stay in one partition, in order); the event id also travels as the
    ``event_id`` header / attribute.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    partner = contract.partner(partner_name)
    rng = random.Random(seed)

    def events() -> Iterable[tuple[bytes, dict[str, str]]]:
        for i in range(count):
            payload, attrs = make_event(partner, i, rng, seed)
            doc_user = _user_of(partner, payload, attrs)
            attrs.setdefault("event_id", f"{partner.name}-{seed}-{i:08d}")
            if doc_user is not None:
                attrs.setdefault("user_key", doc_user)
            yield payload, attrs

    return send_payloads(contract, partner_name, events(), rate=rate, key_attribute="user_key")


def _user_of(partner: PartnerContract, payload: bytes, attrs: Mapping[str, str]) -> Optional[str]:
    loc = partner.envelope.user_id
    if loc.startswith("attribute:"):
        return attrs.get(loc.split(":", 1)[1])
    node: Any = orjson.loads(payload)
    for p in loc.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(p)
    return None if node is None else str(node)
