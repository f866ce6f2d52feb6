"""Typed records passed between pipeline stages.

Every record is a ``NamedTuple`` of primitive fields so Beam picks a schema
(Row) coder instead of pickle. Dynamic row content (flattened columns) travels
as orjson-encoded ``bytes``: compact, deterministic and fast to (de)code.

This module is pure Python; it is the lowest layer and is imported by every
other package (``flatten`` < ``state`` < ``sinks`` < ``ingest`` < ``backfill``
< ``deploy``).
"""


from typing import NamedTuple, Optional

__all__ = [
    "RawMessage",
    "Event",
    "TableRow",
    "AggregateInput",
    "AggregateRow",
    "DeadLetter",
    "Reason",
]


class RawMessage(NamedTuple):
    """One message as a source delivered it, before any decoding.

    ``coords`` identifies where it came from, e.g. ``kafka:topic/3@1200``,
    ``pubsub:projects/p/subscriptions/s#<message id>`` or ``file:gs://b/x.jsonl:17``.
    ``attributes`` is orjson-encoded ``{str: str}`` (Pub/Sub attributes,
    Kafka headers and key); ``b"{}"`` when there are none.
    ``source_time_us`` is the publish / record / file time in microseconds
    since the epoch (0 when unknown).
    """

    partner: str
    source: str  # "pubsub" | "kafka" | "file"
    coords: str
    payload: bytes
    attributes: bytes
    source_time_us: int

    def __repr__(self) -> str:
        # The payload is raw, unmasked partner data: runners log elements (Beam's worker logs them
        # at DEBUG), so the representation carries only its size and digest, never its bytes.
        import hashlib

        digest = hashlib.sha256(self.payload).hexdigest()[:16]
        return (f"RawMessage(partner={self.partner!r}, source={self.source!r}, coords={self.coords!r}, "
                f"payload=<{len(self.payload)} bytes sha256:{digest}…>, attributes=<{len(self.attributes)} bytes>, "
                f"source_time_us={self.source_time_us})")

    __str__ = __repr__


class Event(NamedTuple):
    """A decoded, envelope-validated event. ``doc`` is the orjson-encoded object."""

    partner: str
    event_id: str
    user_id: str
    event_time_us: int
    coords: str
    source: str
    doc: bytes


class TableRow(NamedTuple):
    """One warehouse row (main or child), already masked.

    ``row`` is orjson-encoded ``{column: value}``; ``types`` is the
    orjson-encoded ``{column: bigquery_type}`` inferred for it. ``row_id`` is
    deterministic (derived from the event id and path) so replays dedup.
    """

    partner: str
    table: str
    row_id: str
    event_id: str
    event_time_us: int
    row: bytes
    types: bytes


class AggregateInput(NamedTuple):
    """What the stateful aggregation step sees for one event and one aggregate."""

    partner: str
    aggregate: str
    key: str
    event_id: str
    event_time_us: int
    values: bytes  # orjson {column: value} of the columns the aggregate needs


class AggregateRow(NamedTuple):
    """One emitted aggregate value (one row of the aggregates table)."""

    partner: str
    aggregate: str
    key: str
    window: str  # "lifetime" | "7d" ...
    metrics: bytes  # orjson {metric_name: value}
    watermark_us: int  # event-time watermark / max event time this reflects
    version: int  # monotonically increasing per (partner, aggregate, key, window)
    emitted_us: int
    final: bool


class Reason:
    """Dead-letter reason codes. Stable strings: dashboards and tests key on them."""

    BAD_UTF8 = "bad_utf8"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    MISSING_USER_ID = "missing_user_id"
    MISSING_EVENT_ID = "missing_event_id"
    BAD_EVENT_TIME = "bad_event_time"
    UNKNOWN_PARTNER = "unknown_partner"
    FLATTEN_ERROR = "flatten_error"
    TYPE_CONFLICT = "type_conflict"
    LATE = "late"
    SINK_REJECTED = "sink_rejected"
    BAD_FILE = "bad_file"
    EMPTY_LINE = "empty_line"  #: a blank (or whitespace-only) line in a JSONL file: accounted for, not an event


class DeadLetter(NamedTuple):
    """The one dead-letter record shape, used by every step.

    ``payload`` is already masked per the partner's contract (or encrypted when
    it could not be parsed and the partner has annotations): never raw PII.
    ``payload_ref`` is ``hmac-sha256:<hex>`` of the raw payload, keyed with the masking key
    (``Masker.payload_ref``), for correlation: not reversible by brute force. ``message`` names the
    field and the problem, never a payload value of a partner with annotations.
    """

    partner: str
    source: str
    coords: str
    payload: bytes
    payload_ref: str
    error_class: str
    reason: str
    message: str
    step: str
    event_time_us: Optional[int]
    processing_time_us: int
