"""ReadFromKafkaPy: an unbounded Kafka source in pure Python (kafka-python), no Java to launch.

    PBegin -> PCollection[RawMessage]   (source="kafka", coords "kafka:<topic>/<partition>@<offset>")

Shape (every step labelled, see ``_LABELS``)::

    Impulse -> ListPartitions -> DistributePartitions -> ReadPartitions (splittable DoFn)

* ``ListPartitions`` runs once, on a worker: it resolves ``topics`` or
  ``topic_pattern`` to partitions and each partition's start offset
  (``start``: committed [falling back to earliest when the group has no
  commit] | earliest | latest | timestamp:<RFC3339>). Topics created later
  that match the pattern are picked up on the next launch.
* ``ReadPartitions`` is a splittable DoFn whose element is one partition and
  whose restriction is the offset range ``[start, inf)``; every partition is a
  separate restriction, so all partitions are read in parallel. The tracker
  refuses dynamic splits (only self-checkpoints): one reader per partition
  keeps offset commits ordered.
* Offsets are committed to the consumer group only once the records are done
  (``ingest.runner.commit_mode``). On Dataflow, in the bundle finalizer: it
  follows Dataflow's durable commit of the bundle's output. On the local runner
  (Prism keeps in-flight data in memory only), by a background loop that commits
  per partition up to the lowest offset ``sinks.ledger`` still has pending, i.e.
  whose rows / dead letters the warehouse has not committed yet. A crash replays
  from the last commit: at-least-once, made exactly-once downstream by
  ``DropDuplicateEvents`` (seeded with the warehouse's event ids at launch, see
  ``ingest.recovery``) and the warehouse's idempotent row ids.
* Element timestamps are the record timestamps (CreateTime or LogAppendTime).
  The watermark per partition is the largest record timestamp seen; a
  partition with nothing to read is idle and its watermark follows wall-clock
  time minus ``IDLE_WATERMARK_LAG``, so one quiet partition does not hold back
  the pipeline.
* ``attributes`` is orjson of the record headers plus ``kafka.key``; bytes that
  are not UTF-8 are carried as ``base64:<...>``.

This transform never drops a record: decoding happens downstream in
``ParseEnvelope``, so a malformed payload becomes a dead letter carrying its
``coords`` there and the partition keeps moving.
"""
from __future__ import annotations

import base64
import logging
import re
import threading
import time
from datetime import datetime
from functools import partial
from typing import Any, Iterator, NamedTuple, Optional

import apache_beam as beam
import orjson
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp

from flatten.records import RawMessage
from sinks import ledger
from ingest.unbounded import BackgroundLoop, ManualWatermarks, advance_watermark, nothing
from ingest.contract import KafkaSource
from state.coders import register_record

__all__ = ["ReadFromKafkaPy", "KafkaPartition", "to_raw_message", "kafka_attributes", "backlog_records", "END_OFFSETS",
           "native_crc32c"]

_LOG = logging.getLogger(__name__)

#: Step labels: a contract for Dataflow ``--update``; change only with a name mapping.
_LABELS = ("Impulse", "ListPartitions", "DistributePartitions", "AssignPartitions", "ReadPartitions")

END_OF_TIME_OFFSET = 2**63 - 1
#: A partition with nothing to read lets its watermark follow wall-clock time minus this.
IDLE_WATERMARK_LAG = Duration.of(5)
#: How long one ReadPartitions call reads before checkpointing (bounds bundle latency).
MAX_READ_SECONDS = 0.25
#: How long a reader's first connection may wait for the broker inside a bundle (kafka-python's
#: default is 30 s); a broker down then is an outage: the restriction is retried later.
READER_BOOTSTRAP_MS = 5_000
MAX_RECORDS_PER_CALL = 5000
#: Pause before polling an idle partition again.
IDLE_RESUME_DELAY = Duration.of(0.5)
#: How long ListPartitions waits for explicitly named topics to exist.
TOPIC_WAIT_SECONDS = 60.0
KEY_ATTRIBUTE = "kafka.key"
#: How often the local commit loop commits what the warehouse has made durable.
COMMIT_INTERVAL_S = 0.5


def native_crc32c() -> bool:
    """Let kafka-python check record batches' CRC-32C in C. Without the optional ``crc32c`` package (LGPL)
    it does so in pure Python: ~20 ms per 100 KB, 9 % of the live job's bundle time (bench/README.md "Live
    path"). ``google-crc32c`` (Apache-2.0, C; installed with apache-beam[gcp]'s Google Cloud clients)
    computes the same checksum ~2,000x faster. True when the C checksum is in use. Idempotent."""
    from kafka.record import default_records, util

    if util.crc32c_c is not None or getattr(default_records.calc_crc32c, "headwater", False):
        return True
    try:
        import google_crc32c
    except ImportError:
        return False
    if google_crc32c.implementation != "c":
        return False
    value = google_crc32c.value

    def calc_crc32c(memview) -> int:
        return value(bytes(memview))

    calc_crc32c.headwater = True
    default_records.calc_crc32c = calc_crc32c
    return True


native_crc32c()


class KafkaPartition(NamedTuple):
    """One partition to read and the offset the read starts at (resolved once per launch)."""

    topic: str
    partition: int
    start_offset: int


register_record(KafkaPartition)  # a RowCoder (deterministic schema id), not pickle, through the Reshuffle


def _text(value: Optional[bytes]) -> Optional[str]:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode("ascii")


def kafka_attributes(key: Optional[bytes], headers: Any) -> bytes:
    """orjson ``{header: value, 'kafka.key': key}`` (later headers of the same name win)."""
    attrs: dict[str, str] = {}
    for name, value in headers or ():
        text = _text(value)
        attrs[str(name)] = "" if text is None else text
    key_text = _text(key)
    if key_text is not None:
        attrs[KEY_ATTRIBUTE] = key_text
    return orjson.dumps(attrs, option=orjson.OPT_SORT_KEYS)


def to_raw_message(partner: str, record: Any) -> RawMessage:
    """A kafka-python ``ConsumerRecord`` -> RawMessage. Pure; no Beam involved."""
    return RawMessage(
        partner=partner,
        source="kafka",
        coords=f"kafka:{record.topic}/{record.partition}@{record.offset}",
        payload=record.value if record.value is not None else b"",
        attributes=kafka_attributes(record.key, record.headers),
        source_time_us=max(int(record.timestamp), 0) * 1000,
    )


def _consumer(spec: KafkaSource, group: Optional[str], client_id: str, **extra):
    from kafka import KafkaConsumer

    return KafkaConsumer(
        **extra,
        bootstrap_servers=spec.bootstrap_servers.split(","),
        group_id=group,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # an offset lost to retention restarts at the oldest record
        fetch_max_wait_ms=200,
        max_poll_records=500,
        request_timeout_ms=30_000,
    )


def _start_timestamp_ms(start: str) -> int:
    text = start.split(":", 1)[1].strip().replace("Z", "+00:00")
    return int(datetime.fromisoformat(text).timestamp() * 1000)


class _ListPartitionsFn(beam.DoFn):
    """Impulse -> KafkaPartition for every partition of the configured topics, with its start offset."""

    def __init__(self, spec: KafkaSource, partner: str):
        self._spec = spec
        self._partner = partner

    def setup(self):
        self._client = _consumer(self._spec, self._spec.group_id, f"headwater-{self._partner}-list")

    def teardown(self):
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    def _topics(self) -> list[str]:
        spec = self._spec
        deadline = time.monotonic() + TOPIC_WAIT_SECONDS
        while True:
            existing = self._client.topics()
            if spec.topic_pattern:
                rx = re.compile(spec.topic_pattern)
                found = sorted(t for t in existing if rx.fullmatch(t))
                missing: list[str] = [] if found else [spec.topic_pattern]
            else:
                found = [t for t in spec.topics if t in existing]
                missing = [t for t in spec.topics if t not in existing]
            if not missing:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"partner {self._partner!r}: Kafka at {spec.bootstrap_servers} has no topic(s) {missing} "
                    f"after {TOPIC_WAIT_SECONDS:.0f}s (create them, e.g. with 'headwater publish')")
            time.sleep(1.0)

    def process(self, _impulse) -> Iterator[KafkaPartition]:
        from kafka import TopicPartition

        spec = self._spec
        tps = []
        for topic in self._topics():
            for p in sorted(self._client.partitions_for_topic(topic) or ()):
                tps.append(TopicPartition(topic, p))
        if not tps:
            raise RuntimeError(f"partner {self._partner!r}: no Kafka partitions found for {spec.topics or spec.topic_pattern}")
        begin = self._client.beginning_offsets(tps)
        end = self._client.end_offsets(tps)
        if spec.start == "earliest":
            starts = dict(begin)
        elif spec.start == "latest":
            starts = dict(end)
        elif spec.start.startswith("timestamp:"):
            found = self._client.offsets_for_times({tp: _start_timestamp_ms(spec.start) for tp in tps})
            starts = {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in tps}
        else:  # committed, falling back to earliest for a new group
            starts = {}
            for tp in tps:
                committed = self._client.committed(tp)
                starts[tp] = committed if committed is not None else begin[tp]
        for tp in tps:
            start = max(starts[tp], begin[tp])
            _LOG.info("partner %s: reading kafka %s/%d from offset %d (%s)", self._partner, tp.topic, tp.partition,
                      start, spec.start)
            yield KafkaPartition(tp.topic, tp.partition, start)


class _AssignPartitionFn(beam.DoFn):
    """Identity on KafkaPartition, fused into the stage that pairs partitions with restrictions.

    Prism asks to finalize every bundle of that stage (it carries the reader's
    finalization requirement); registering a no-op here keeps the SDK from
    logging "Bundle is not in a finalizable state".
    """

    def process(self, part: KafkaPartition, fin=beam.DoFn.BundleFinalizerParam) -> Iterator[KafkaPartition]:
        fin.register(nothing)
        yield part


class _NoDynamicSplitTracker(OffsetRestrictionTracker):
    """Offset tracker that only allows self-checkpoints (fraction 0).

    A dynamic split would put two readers on one partition; the later one's
    offset commits could then overtake records the earlier one has not yet
    made durable, and a crash would lose them.
    """

    def try_split(self, fraction_of_remainder):
        if fraction_of_remainder > 0:
            return None
        return super().try_split(fraction_of_remainder)


#: (topic, partition) -> the partition's end offset (high watermark) as this process's reader last saw it.
END_OFFSETS: dict[tuple[str, int], int] = {}


def backlog_records(end_offset: Optional[int], position: int) -> float:
    """Records left to read from ``position`` (the next offset to read) given the end offset; 1.0 when unknown."""
    if end_offset is None:
        return 1.0
    return float(max(0, end_offset - position))


def note_end_offset(reader: Any, tp: Any) -> None:
    """Remember ``reader``'s last seen high watermark of ``tp`` (from its fetch responses) in END_OFFSETS."""
    hw = reader.highwater(tp)
    if hw is not None:
        END_OFFSETS[(tp.topic, tp.partition)] = hw


class _PartitionRestrictions(RestrictionProvider):
    def initial_restriction(self, element: KafkaPartition) -> OffsetRange:
        return OffsetRange(element.start_offset, END_OF_TIME_OFFSET)

    def create_tracker(self, restriction: OffsetRange) -> _NoDynamicSplitTracker:
        return _NoDynamicSplitTracker(restriction)

    def split(self, element, restriction):
        yield restriction

    def restriction_size(self, element, restriction) -> float:
        """The partition's backlog in records: end offset minus the restriction's start (what Beam's
        KafkaIO reports), so Dataflow's autoscaler sees it grow during a spike. The end offset is the
        high watermark this worker's reader last saw in a fetch (no broker round trip); before the
        partition's first read on this worker it is unknown and every partition weighs 1."""
        return backlog_records(END_OFFSETS.get((element.topic, element.partition)), restriction.start)

    def truncate(self, element, restriction):
        return None  # drain: stop reading, offsets already committed stay committed


class _ReadPartitionFn(beam.DoFn):
    """KafkaPartition -> RawMessage, unbounded; see the module docstring for the guarantees.

    Note on the signature: ``fin`` must come before the restriction and
    watermark parameters, or Beam 2.77 binds the finalizer positionally onto
    ``tracker`` ("got multiple values for argument 'tracker'").
    """

    def __init__(self, spec: KafkaSource, partner: str, mode: str = "finalize"):
        self._spec = spec
        self._partner = partner
        self._mode = mode  # "finalize" (Dataflow) | "ledger" (local runner; see ingest.runner.commit_mode)
        self._records = Metrics.counter("headwater", "kafka_records_read")
        self._commits = Metrics.counter("headwater", "kafka_offset_commits")

    def setup(self):
        self._lock = threading.Lock()
        self._readers: dict[tuple[str, int], Any] = {}
        self._positions: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        # finalize mode commits from the bundle finalizer; ledger mode from _LedgerCommitter's loop
        self._committer = (_consumer(self._spec, self._spec.group_id, f"headwater-{self._partner}-commit")
                           if self._mode != "ledger" else None)
        self._commit_lock = threading.Lock()
        self._busy: dict[tuple[str, int], threading.Lock] = {}
        self._closing = False
        self._loop: Optional[_LedgerCommitter] = None
        if self._mode == "ledger":
            _quiet_kafka_client()
            self._loop = _LedgerCommitter.ensure(self._spec, self._partner)

    def teardown(self):
        # Cancellation tears the DoFn down while a read may still be polling on another
        # thread: stop new polls, wait for the current one, then close.
        self._closing = True
        for key, reader in list(getattr(self, "_readers", {}).items()):
            busy = self._busy.get(key)
            got = busy.acquire(timeout=5.0) if busy is not None else False
            try:
                reader.close(autocommit=False)
            finally:
                if got:
                    busy.release()
        committer = getattr(self, "_committer", None)
        if committer is not None:
            with self._commit_lock:
                committer.close(autocommit=False)

    def _reader(self, part: KafkaPartition):
        from kafka import TopicPartition

        key = (part.topic, part.partition)
        with self._lock:
            reader = self._readers.get(key)
            if reader is None:
                reader = _consumer(self._spec, None, f"headwater-{self._partner}-{part.topic}-{part.partition}",
                           bootstrap_timeout_ms=READER_BOOTSTRAP_MS)
                reader.assign([TopicPartition(part.topic, part.partition)])
                self._readers[key] = reader
                self._busy[key] = threading.Lock()
        return reader

    def _commit(self, topic: str, partition: int, next_offset: int) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        key = (topic, partition)
        with self._commit_lock:
            if self._closing or self._committed.get(key, -1) >= next_offset:
                return
            self._committer.commit({TopicPartition(topic, partition): OffsetAndMetadata(next_offset, "", -1)})
            self._committed[key] = next_offset
        self._commits.inc()

    @beam.DoFn.unbounded_per_element()
    def process(self, part: KafkaPartition, fin=beam.DoFn.BundleFinalizerParam,
                tracker=beam.DoFn.RestrictionParam(_PartitionRestrictions()),
                watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarks())):
        from kafka import TopicPartition

        tp = TopicPartition(part.topic, part.partition)
        key = (part.topic, part.partition)
        if self._loop is not None:  # the commit loop, replaced here if a step of it is stuck
            self._loop = _LedgerCommitter.ensure(self._spec, self._partner)
        try:
            reader = self._reader(part)
        except Exception as exc:  # noqa: BLE001 - no broker to bootstrap from: an outage, not a failed bundle
            # A new instance of this DoFn (the SDK makes one per concurrent bundle) needs a client for
            # the partition while the broker is down: retry the restriction later, as if idle.
            _kafka_unreachable(exc)
            fin.register(nothing)
            tracker.defer_remainder(IDLE_RESUME_DELAY)
            return
        position = tracker.current_restriction().start
        if self._positions.get(key) != position:
            reader.seek(tp, position)
        self._positions[key] = position
        deadline = time.monotonic() + MAX_READ_SECONDS
        last: Optional[int] = None
        count = 0
        while count < MAX_RECORDS_PER_CALL and time.monotonic() < deadline and not self._closing:
            with self._busy[key]:
                if self._closing:
                    break
                batch = reader.poll(timeout_ms=200, max_records=500).get(tp, [])
            if not batch:
                break
            _kafka_reachable()
            for record in batch:
                if not tracker.try_claim(record.offset):
                    self._positions.pop(key, None)
                    return
                msg = to_raw_message(self._partner, record)
                if self._loop is not None:  # pending until the warehouse has it (sinks.ledger)
                    ledger.register_kafka(msg.coords, self._loop.group, part.topic, part.partition, record.offset)
                ts = Timestamp(micros=msg.source_time_us) if msg.source_time_us else watermark.current_watermark()
                if ts is None:
                    ts = Timestamp.now()
                yield beam.window.TimestampedValue(msg, ts)
                advance_watermark(watermark, ts)
                last = record.offset
                count += 1
            self._positions[key] = last + 1 if last is not None else position
        note_end_offset(reader, tp)
        if last is not None:
            self._records.inc(count)
            if self._loop is None:
                fin.register(partial(self._commit, part.topic, part.partition, last + 1))
            else:
                fin.register(nothing)  # the ledger's commit loop commits once the warehouse has the records
            tracker.defer_remainder(Duration.of(0))
        else:
            # Prism asks to finalize every bundle of a stage that may need it; a bundle
            # that registered nothing makes the SDK log "not in a finalizable state".
            fin.register(nothing)
            advance_watermark(watermark, Timestamp.now() - IDLE_WATERMARK_LAG)
            tracker.defer_remainder(IDLE_RESUME_DELAY)


class _LedgerCommitter:
    """The local commit loop of one partner's consumer group (one per process, shared by readers).

    Every ``COMMIT_INTERVAL_S`` it commits, per partition the ledger knows for the group,
    ``ledger.kafka_position``: the lowest offset whose records the warehouse has not committed yet
    (or one past the last read). What to commit lives in the ledger, not here, so a replacement
    committer (a stuck loop replaced, the final commit at stop: ``BackgroundLoop``) commits the
    same. A broker outage is retried with a bounded backoff and logged once; after
    ``FRESH_CLIENT_AFTER`` failed commits in a row the client is closed and a new one made (a client
    that came through an outage in a bad state must not fail every later commit).
    """

    FRESH_CLIENT_AFTER = 3

    def __init__(self, spec: KafkaSource, partner: str):
        self._spec = spec
        self._partner = partner
        self.group = spec.group_id or f"headwater-{partner}"
        self._committed: dict[tuple[str, int], int] = {}
        self._consumer = None
        self._failed = 0

    @classmethod
    def ensure(cls, spec: KafkaSource, partner: str) -> "_LedgerCommitter":
        name = f"kafka-commit[{partner}/{spec.group_id}@{spec.bootstrap_servers}]"
        return BackgroundLoop.ensure(name, lambda: cls(spec, partner), COMMIT_INTERVAL_S)

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close(autocommit=False)

    def _todo(self) -> dict[tuple[str, int], int]:
        todo = {}
        for topic, p in ledger.kafka_partitions(self.group):
            pos = ledger.kafka_position(self.group, topic, p)
            if pos is not None and pos > self._committed.get((topic, p), -1):
                todo[(topic, p)] = pos
        return todo

    def uncommitted(self) -> bool:
        """Some partition has durable records beyond what this committer committed."""
        return bool(self._spec.group_id) and bool(self._todo())

    def pending(self) -> str:
        parts = []
        for topic, p in ledger.kafka_partitions(self.group):
            parts.append(f"{topic}/{p}: committed {self._committed.get((topic, p), '-')}, to commit "
                         f"{ledger.kafka_position(self.group, topic, p)}, "
                         f"{ledger.kafka_pending(self.group, topic, p)} records not yet in the warehouse")
        return "; ".join(parts) or "nothing"

    def step(self) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        if not self._spec.group_id:
            return  # no consumer group: nothing to commit to
        todo = self._todo()
        if not todo:
            return
        try:
            if self._consumer is None:
                self._consumer = _consumer(self._spec, self._spec.group_id, f"headwater-{self._partner}-commit")
            self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(pos, "", -1)
                                   for (t, p), pos in todo.items()}, timeout_ms=5000)
        except Exception:
            self._failed += 1
            if self._failed >= self.FRESH_CLIENT_AFTER:
                self._failed = 0
                try:
                    self.close()
                except Exception:  # noqa: BLE001 - closing a client of a broker that is gone
                    self._consumer = None
            raise
        self._failed = 0
        _kafka_reachable()
        self._committed.update(todo)
        _COMMITS.inc(len(todo))


class _KafkaClientNoise(logging.Handler):
    """kafka-python logs every failed reconnect (hundreds of ``ECONNREFUSED`` lines a minute while a
    broker is down). On the local runner those records pass through here: the first one of an outage
    is kept, with one headwater line saying what happens next; the rest are counted, not printed,
    until :func:`_kafka_reachable` reports the broker back (a poll returned records or a commit
    succeeded), which logs one line with the outage's length. CRITICAL records always pass."""

    def __init__(self):
        super().__init__()
        self.since: Optional[float] = None
        self.suppressed = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.CRITICAL:
            if self.since is not None or (record.levelno < logging.ERROR and record.name.startswith(_CONNECTION_LOGGERS)):
                self.suppressed += 1  # connection churn ("No node available ...") is not news on its own
                return
            if record.levelno >= logging.ERROR:
                self.since = time.monotonic()
                _LOG.warning("headwater kafka: the broker is unreachable (%s: %s); reads and offset commits retry "
                             "until it is back; further client errors are counted, not logged",
                             record.name, record.getMessage()[:200])
                return
        logging.getLogger().handle(record)

    def reachable(self) -> None:
        if self.since is not None:
            _LOG.warning("headwater kafka: the broker is reachable again after %.1fs (%d client log lines "
                         "suppressed)", time.monotonic() - self.since, self.suppressed)
            self.since = None
            self.suppressed = 0


_CONNECTION_LOGGERS = ("kafka.net", "kafka.cluster", "kafka.conn", "kafka.client")
_NOISE = _KafkaClientNoise()


def _quiet_kafka_client() -> None:
    """Route kafka-python's log records through ``_NOISE`` (once per process)."""
    lg = logging.getLogger("kafka")
    if _NOISE not in lg.handlers:
        lg.addHandler(_NOISE)
        lg.propagate = False


def _kafka_reachable() -> None:
    if _NOISE.since is not None:
        _NOISE.reachable()


def _kafka_unreachable(exc: BaseException) -> None:
    """A headwater client call failed for want of a broker: the outage's one log line (shared with
    kafka-python's own errors, ``_NOISE``), then counted until the broker is back."""
    _NOISE.emit(logging.LogRecord("kafka.headwater", logging.ERROR, __file__, 0, "%s: %s",
                                  (type(exc).__name__, str(exc)[:200]), None))


_COMMITS = Metrics.counter("headwater", "kafka_offset_commits")


class ReadFromKafkaPy(beam.PTransform):
    """PBegin -> PCollection[RawMessage] from one partner's Kafka topics.

    Runs on any runner that executes unbounded splittable DoFns with bundle
    finalization (Prism locally, Dataflow Runner v2); not on the bundle-based
    DirectRunner (apache/beam#26577). Malformed payloads pass through as
    RawMessages and become dead letters in ``ParseEnvelope``.
    """

    def __init__(self, spec: KafkaSource, partner: str, label: Optional[str] = None):
        super().__init__(label)
        if not isinstance(spec, KafkaSource):
            raise TypeError(f"partner {partner!r}: ReadFromKafkaPy needs a KafkaSource, got {type(spec).__name__}")
        if not spec.bootstrap_servers.strip():
            raise ValueError(f"partner {partner!r}: kafka bootstrap_servers is empty")
        if spec.start.startswith("timestamp:"):
            try:
                _start_timestamp_ms(spec.start)
            except ValueError as exc:
                raise ValueError(f"partner {partner!r}: kafka start {spec.start!r}: {exc}") from None
        self._spec = spec
        self._partner = partner

    def expand(self, pbegin):
        from ingest.runner import commit_mode

        mode = commit_mode(pbegin.pipeline.options)
        impulse, list_partitions, distribute, assign, read = _LABELS
        return (
            pbegin
            | impulse >> beam.Impulse()
            | list_partitions >> beam.ParDo(_ListPartitionsFn(self._spec, self._partner)).with_output_types(KafkaPartition)
            | distribute >> beam.Reshuffle()
            | assign >> beam.ParDo(_AssignPartitionFn()).with_output_types(KafkaPartition)
            | read >> beam.ParDo(_ReadPartitionFn(self._spec, self._partner, mode)).with_output_types(RawMessage)
        )
