"""ReadFromPartnerPubSub: one partner's Pub/Sub subscription as RawMessages.

    PBegin -> PCollection[RawMessage]   (source="pubsub", coords "pubsub:<subscription>#<message id>")

``attributes`` is orjson of the message attributes, ``source_time_us`` the
publish time. Element timestamps follow Beam's ``timestamp_attribute``
semantics: the attribute's value (epoch milliseconds or RFC 3339) when the
contract names one, else the publish time.

Two implementations, chosen by runner (``ingest.runner.uses_native_pubsub``):

* ``NativeRead`` on Dataflow and the DirectRunner: Beam's own
  ``ReadFromPubSub(with_attributes=True, timestamp_attribute, id_label)``;
  Dataflow acks after its durable commit and dedups on ``id_label``.
* ``PullRead`` everywhere else (Prism, the local streaming runner; Python's
  ReadFromPubSub is a runner-native read that Prism rejects with
  ``unsupported feature ... beam:transform:pubsub_read:v1``): a splittable DoFn
  that pulls with google-cloud-pubsub (honours PUBSUB_EMULATOR_HOST). Prism keeps
  in-flight data in memory only, so a message is acked only once ``sinks.ledger``
  reports it done (its rows or dead letter committed by the warehouse, or dropped as
  a duplicate), by a background loop that also extends the lease of messages still
  in flight. Unacked messages (a crash) are redelivered after the subscription's ack
  deadline. Pull errors (emulator restarted, endpoint unreachable) read as an empty
  pull, logged once per outage. Redeliveries and ``id_attribute`` duplicates are removed
  downstream by ``DropDuplicateEvents`` (keyed on the event id, which the
  envelope may read from ``attribute:<id_attribute>``) and by the warehouse's
  idempotent row ids.

Nothing is dropped here: payloads are decoded in ``ParseEnvelope``, so a
malformed message becomes a dead letter with these coords and is acked like
any other, never redelivered forever. A ``timestamp_attribute`` that is
missing or unparseable falls back to the publish time here (the envelope's
event-time check decides whether that is a dead letter).
"""
from __future__ import annotations

import logging
import time
from datetime import datetime
from functools import partial
from typing import Any, Iterator, Mapping, Optional

import apache_beam as beam
import orjson
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp

from flatten.records import RawMessage
from sinks import ledger
from ingest.unbounded import BackgroundLoop, ManualWatermarks, advance_watermark, nothing
from ingest.contract import PubSubSource

__all__ = ["ReadFromPartnerPubSub", "pubsub_raw_message", "attribute_timestamp_us", "pull_backlog", "PULL_BACKLOG"]

_LOG = logging.getLogger(__name__)

MAX_MESSAGES_PER_PULL = 500
PULL_TIMEOUT_SECONDS = 2.0
MAX_READ_SECONDS = 0.25
IDLE_RESUME_DELAY = Duration.of(0.5)
#: With nothing to pull the watermark follows wall-clock time minus this.
IDLE_WATERMARK_LAG = Duration.of(5)
_END = 2**63 - 1
#: The ack loop acks done messages this often, and extends the lease of those in flight every
#: LEASE_EVERY_S to LEASE_SECONDS.
ACK_INTERVAL_S = 0.5
LEASE_EVERY_S = 5.0
LEASE_SECONDS = 60
#: An ack batch that keeps failing is given up after this many attempts (a restarted emulator forgot
#: the ack ids): those messages are redelivered if the server still has them and dropped as duplicates.
ACK_ATTEMPTS = 20


def attribute_timestamp_us(value: Optional[str]) -> Optional[int]:
    """Beam timestamp_attribute parsing: epoch milliseconds or RFC 3339 -> microseconds; None if unusable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.lstrip("-").isdigit():
        return int(text) * 1000
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return int(parsed.timestamp() * 1_000_000)


def _publish_us(publish_time: Any) -> int:
    if publish_time is None:
        return 0
    if isinstance(publish_time, datetime):
        return int(publish_time.timestamp() * 1_000_000)
    seconds = getattr(publish_time, "seconds", 0)  # protobuf Timestamp
    return int(seconds) * 1_000_000 + int(getattr(publish_time, "nanos", 0)) // 1000


def pubsub_raw_message(partner: str, subscription: str, message_id: str, data: bytes,
                       attributes: Mapping[str, str], publish_time: Any) -> RawMessage:
    """Pure: one Pub/Sub message -> RawMessage."""
    return RawMessage(
        partner=partner,
        source="pubsub",
        coords=f"pubsub:{subscription}#{message_id}",
        payload=bytes(data or b""),
        attributes=orjson.dumps(dict(attributes or {}), option=orjson.OPT_SORT_KEYS),
        source_time_us=_publish_us(publish_time),
    )


def _element_time_us(msg: RawMessage, attributes: Mapping[str, str], timestamp_attribute: Optional[str]) -> int:
    if timestamp_attribute:
        us = attribute_timestamp_us(attributes.get(timestamp_attribute))
        if us is not None:
            return us
    return msg.source_time_us


class _NativeToRaw(beam.DoFn):
    def __init__(self, partner: str, subscription: str):
        self._partner = partner
        self._subscription = subscription

    def process(self, m) -> Iterator[RawMessage]:
        yield pubsub_raw_message(self._partner, self._subscription, m.message_id or "", m.data,
                                 m.attributes or {}, m.publish_time)


class _NativeRead(beam.PTransform):
    """Beam's ReadFromPubSub (Dataflow, DirectRunner) + conversion; timestamps set by Beam."""

    def __init__(self, spec: PubSubSource, partner: str, label: str = "NativeRead"):
        super().__init__(label)
        self._spec = spec
        self._partner = partner

    def expand(self, pbegin):
        spec = self._spec
        return (
            pbegin
            | "ReadFromPubSub" >> beam.io.ReadFromPubSub(
                subscription=spec.subscription, with_attributes=True,
                timestamp_attribute=spec.timestamp_attribute, id_label=spec.id_attribute)
            | "ToRawMessage" >> beam.ParDo(_NativeToRaw(self._partner, spec.subscription)).with_output_types(RawMessage)
        )


class _CheckpointOnlyTracker(OffsetRestrictionTracker):
    """Positions count pulls, not messages; only self-checkpoints, never dynamic splits."""

    def try_split(self, fraction_of_remainder):
        if fraction_of_remainder > 0:
            return None
        return super().try_split(fraction_of_remainder)


#: subscription -> lower-bound backlog estimate (messages) from this process's last pulls (see restriction_size).
PULL_BACKLOG: dict[str, float] = {}


def pull_backlog(pulled: list[int], max_per_pull: int = MAX_MESSAGES_PER_PULL) -> float:
    """Backlog lower bound after one read call's pulls (message counts, in order): the messages of the
    trailing run of full pulls (there was more behind each), or 0 when the last pull came back short."""
    if not pulled or pulled[-1] < max_per_pull:
        return 0.0
    n = 0
    for k in reversed(pulled):
        if k < max_per_pull:
            break
        n += k
    return float(n)


class _PullRestrictions(RestrictionProvider):
    def initial_restriction(self, element: str) -> OffsetRange:
        return OffsetRange(0, _END)

    def create_tracker(self, restriction: OffsetRange) -> _CheckpointOnlyTracker:
        return _CheckpointOnlyTracker(restriction)

    def split(self, element, restriction):
        yield restriction

    def restriction_size(self, element, restriction) -> float:
        """Backlog estimate of the subscription: Pub/Sub has no offsets (its exact backlog is the Cloud
        Monitoring metric ``num_undelivered_messages``, which Dataflow's native read uses), so this is a
        lower bound from the last pulls on this worker: what they returned while pulls came back full,
        0 once a pull came back short (drained); 1.0 before the first pull."""
        return PULL_BACKLOG.get(element, 1.0)

    def truncate(self, element, restriction):
        return None  # drain: stop pulling; unacked messages are redelivered to the next job


class _PullFn(beam.DoFn):
    """subscription -> RawMessage, unbounded; acks in the bundle finalizer.

    The watermark after a pull is the oldest element timestamp of that pull
    (kept monotonic): Pub/Sub has no order, so this is the estimate Dataflow
    also makes from the backlog; an empty pull means the backlog is drained and
    the watermark follows wall-clock time minus ``IDLE_WATERMARK_LAG``.
    """

    def __init__(self, spec: PubSubSource, partner: str, mode: str = "finalize"):
        self._spec = spec
        self._partner = partner
        self._mode = mode  # "finalize" (Dataflow) | "ledger" (local runner; see ingest.runner.commit_mode)
        self._pulled = Metrics.counter("headwater", "pubsub_messages_pulled")
        self._acked = Metrics.counter("headwater", "pubsub_messages_acked")

    def setup(self):
        from google.cloud import pubsub_v1

        self._client = pubsub_v1.SubscriberClient()
        self._outage_since: Optional[float] = None
        self._acker: Optional[_LedgerAcker] = None
        if self._mode == "ledger":
            self._acker = _LedgerAcker.ensure(self._spec.subscription, self._partner)

    def teardown(self):
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    def _ack(self, subscription: str, ack_ids: list[str]) -> None:
        for i in range(0, len(ack_ids), 1000):
            self._client.acknowledge(request={"subscription": subscription, "ack_ids": ack_ids[i:i + 1000]})
        self._acked.inc(len(ack_ids))

    def _pull(self, subscription: str) -> list:
        from google.api_core import exceptions

        try:
            response = self._client.pull(
                request={"subscription": subscription, "max_messages": MAX_MESSAGES_PER_PULL},
                timeout=PULL_TIMEOUT_SECONDS)
        except exceptions.DeadlineExceeded:
            return []  # nothing arrived within the timeout: the subscription is idle
        except exceptions.Cancelled:
            return []  # the client was closed by teardown (job cancelled); nothing was received
        except (exceptions.ServiceUnavailable, exceptions.NotFound, exceptions.InternalServerError,
                exceptions.Unknown, exceptions.Aborted, exceptions.RetryError) as exc:
            # The endpoint is down or restarted (an emulator forgets its subscriptions): an outage,
            # not a failure of the job. Logged once; the read keeps polling.
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                if isinstance(exc, exceptions.NotFound):
                    # Said plainly: a restarted emulator forgets its topics and subscriptions, and a deleted
                    # subscription on Cloud Pub/Sub never comes back by itself; the read waits for it.
                    _LOG.warning("partner %s: subscription %s does not exist (deleted, or the emulator restarted "
                                 "and forgot it); no messages can arrive until it is created again "
                                 "(headwater publish or gcloud pubsub subscriptions create); retrying",
                                 self._partner, subscription)
                else:
                    _LOG.warning("partner %s: pulling %s fails (%s: %s); retrying", self._partner, subscription,
                                 type(exc).__name__, str(exc)[:300])
            time.sleep(min(1.0, PULL_TIMEOUT_SECONDS))
            return []
        if self._outage_since is not None:
            _LOG.warning("partner %s: pulling %s works again after %.1fs", self._partner, subscription,
                         time.monotonic() - self._outage_since)
            self._outage_since = None
        return list(response.received_messages)

    @beam.DoFn.unbounded_per_element()
    def process(self, subscription: str, fin=beam.DoFn.BundleFinalizerParam,
                tracker=beam.DoFn.RestrictionParam(_PullRestrictions()),
                watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarks())):
        # ``fin`` precedes the restriction params: Beam 2.77 binds it positionally otherwise.
        spec = self._spec
        if self._acker is not None:  # the ack loop, replaced here if a step of it is stuck
            self._acker = _LedgerAcker.ensure(self._spec.subscription, self._partner)
        position = tracker.current_restriction().start
        deadline = time.monotonic() + MAX_READ_SECONDS
        ack_ids: list[str] = []
        pulls: list[int] = []
        while time.monotonic() < deadline:
            if not tracker.try_claim(position):
                break
            position += 1
            received = self._pull(subscription)
            pulls.append(len(received))
            if not received:
                break
            oldest: Optional[Timestamp] = None
            for r in received:
                m = r.message
                attrs = dict(m.attributes)
                msg = pubsub_raw_message(self._partner, subscription, m.message_id, m.data, attrs, m.publish_time)
                ts = Timestamp(micros=_element_time_us(msg, attrs, spec.timestamp_attribute))
                oldest = ts if oldest is None or ts < oldest else oldest
                ack_ids.append(r.ack_id)
                if self._acker is not None:  # pending until the warehouse has it (sinks.ledger)
                    ledger.register_pubsub(msg.coords, subscription, r.ack_id)
                yield beam.window.TimestampedValue(msg, ts)
            self._pulled.inc(len(received))
            if oldest is not None:
                advance_watermark(watermark, oldest)
        PULL_BACKLOG[subscription] = pull_backlog(pulls)
        if ack_ids:
            if self._acker is None:
                fin.register(partial(self._ack, subscription, ack_ids))
            else:
                fin.register(nothing)  # the ledger's ack loop acks once the warehouse has the messages
            tracker.defer_remainder(Duration.of(0))
        else:
            fin.register(nothing)  # Prism finalizes every bundle of this stage
            advance_watermark(watermark, Timestamp.now() - IDLE_WATERMARK_LAG)
            tracker.defer_remainder(IDLE_RESUME_DELAY)


class _LedgerAcker:
    """The local ack loop of one subscription (one per process, shared by the pulling DoFns).

    Acks the messages ``sinks.ledger`` reports done and, every ``LEASE_EVERY_S``, extends the lease
    of those still in flight. Failures are an outage (``BackgroundLoop``: bounded backoff, one log
    line); an ack batch failing ``ACK_ATTEMPTS`` times is given up (logged with its size).
    """

    def __init__(self, subscription: str, partner: str):
        self._subscription = subscription
        self._partner = partner
        self._client = None
        self._attempts = 0
        self._last_lease = 0.0
        self._acked = Metrics.counter("headwater", "pubsub_messages_acked")

    @classmethod
    def ensure(cls, subscription: str, partner: str) -> "_LedgerAcker":
        name = f"pubsub-ack[{partner}/{subscription}]"
        return BackgroundLoop.ensure(name, lambda: cls(subscription, partner), ACK_INTERVAL_S)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def pending(self) -> str:
        return (f"{len(ledger.pubsub_pending(self._subscription))} messages in flight, "
                f"{self._attempts} failed ack attempts of the current batch")

    def step(self) -> None:
        from google.cloud import pubsub_v1

        sub = self._subscription
        if self._client is None:
            self._client = pubsub_v1.SubscriberClient()
        done = ledger.pubsub_take_done(sub)
        while done:
            batch = done[:1000]
            try:
                self._client.acknowledge(request={"subscription": sub, "ack_ids": batch}, timeout=10)
            except Exception:
                self._attempts += 1
                if self._attempts >= ACK_ATTEMPTS:
                    _LOG.warning("partner %s: giving up acking %d messages of %s after %d attempts; the server "
                                 "redelivers them if it still has them and they are dropped as duplicates",
                                 self._partner, len(done), sub, self._attempts)
                    self._attempts = 0
                else:
                    ledger.pubsub_give_back(sub, done)
                raise
            self._acked.inc(len(batch))
            done = done[1000:]
        self._attempts = 0
        now = time.monotonic()
        if now - self._last_lease >= LEASE_EVERY_S:
            self._last_lease = now
            leased = ledger.pubsub_pending(sub)
            for i in range(0, len(leased), 1000):
                self._client.modify_ack_deadline(request={
                    "subscription": sub, "ack_ids": leased[i:i + 1000], "ack_deadline_seconds": LEASE_SECONDS},
                    timeout=10)



class _PullRead(beam.PTransform):
    """Impulse -> subscription -> pulling splittable DoFn (Prism and other portable runners)."""

    def __init__(self, spec: PubSubSource, partner: str, label: str = "PullRead"):
        super().__init__(label)
        self._spec = spec
        self._partner = partner

    def expand(self, pbegin):
        from ingest.runner import commit_mode

        subscription = self._spec.subscription
        mode = commit_mode(pbegin.pipeline.options)
        return (
            pbegin
            | "Impulse" >> beam.Impulse()
            | "Subscription" >> beam.ParDo(_EmitSubscription(subscription)).with_output_types(str)
            | "PullMessages" >> beam.ParDo(_PullFn(self._spec, self._partner, mode)).with_output_types(RawMessage)
        )


class _EmitSubscription(beam.DoFn):
    """Impulse -> the subscription name. Registers a no-op finalizer: Prism fuses this step with
    the SDF's restriction pairing and asks to finalize the bundle, which the SDK otherwise logs
    as an error ("Bundle is not in a finalizable state")."""

    def __init__(self, subscription: str):
        self._subscription = subscription

    def process(self, _impulse, fin=beam.DoFn.BundleFinalizerParam) -> Iterator[str]:
        fin.register(nothing)
        yield self._subscription


class ReadFromPartnerPubSub(beam.PTransform):
    """PBegin -> PCollection[RawMessage] for one partner's subscription (see the module docstring)."""

    def __init__(self, spec: PubSubSource, partner: str, label: Optional[str] = None):
        super().__init__(label)
        if not isinstance(spec, PubSubSource):
            raise TypeError(f"partner {partner!r}: ReadFromPartnerPubSub needs a PubSubSource, got {type(spec).__name__}")
        self._spec = spec
        self._partner = partner

    def expand(self, pbegin):
        from ingest.runner import uses_native_pubsub

        if uses_native_pubsub(pbegin.pipeline.options):
            return pbegin | "NativeRead" >> _NativeRead(self._spec, self._partner)
        return pbegin | "PullRead" >> _PullRead(self._spec, self._partner)
