"""Coders for every element type of the graph, so no PCollection falls back to pickle.

``flatten.records`` is pure Python; this registers Beam's RowCoder for each
record type so every PCollection of them, and every stateful step's input,
uses a portable, deterministic schema coder instead of pickle. Imported by
``ingest.pipeline`` (and any module that builds steps from these records).

Row schema ids are derived from the record's qualified name and fields (Beam
otherwise draws a random uuid per process), so two builds of the same job
serialise identical coders: Dataflow's update check compares them.

Beam types that appear inside Beam's own composites (``Reshuffle`` carries an
``Optional[Timestamp]``; ``ReadFromPubSub(with_attributes=True)`` emits
``PubsubMessage``) get explicit coders too; ``tests/deploy/test_typed_graph.py``
walks the Dataflow graph and fails on any pickled coder left.
"""
from __future__ import annotations

import typing
import uuid
import apache_beam as beam
from apache_beam.coders import coders as _coders
from apache_beam.utils.timestamp import Timestamp

from flatten.records import AggregateInput, AggregateRow, DeadLetter, Event, RawMessage, TableRow

__all__ = ["RECORD_TYPES", "register", "register_record", "schema_id", "PubsubMessageCoder"]

RECORD_TYPES = (RawMessage, Event, TableRow, AggregateInput, AggregateRow, DeadLetter)
_NAMESPACE = uuid.UUID("5b1f7c9e-2f0a-4c59-9d7e-6a1f0c3b8e21")  # headwater's schema-id namespace (fixed)


def schema_id(t: type) -> str:
    """Deterministic Beam schema id of a NamedTuple: uuid5 of its qualified name and typed fields."""
    fields = ",".join(f"{n}:{tp if isinstance(tp, str) else repr(tp)}" for n, tp in t.__annotations__.items())
    return str(uuid.uuid5(_NAMESPACE, f"{t.__module__}.{t.__qualname__}({fields})"))


def register_record(t: type) -> None:
    """Use a RowCoder with a deterministic schema id for the NamedTuple ``t`` (call before the first build)."""
    hints = t.__annotations__
    if any(isinstance(h, (str, typing.ForwardRef)) for h in hints.values()):
        # ``from __future__ import annotations`` leaves forward references, which Beam types as pickled "any" fields
        t.__annotations__ = typing.get_type_hints(t)
    if "_beam_schema_id" not in t.__dict__:
        setattr(t, "_beam_schema_id", schema_id(t))
    beam.coders.registry.register_coder(t, beam.coders.RowCoder)


class PubsubMessageCoder(_coders.Coder):
    """``PubsubMessage`` as its protobuf bytes (Beam's own ``_to_proto_str``/``_from_proto_str``)."""

    def encode(self, value) -> bytes:
        return value._to_proto_str()

    def decode(self, encoded: bytes):
        from apache_beam.io.gcp.pubsub import PubsubMessage

        return PubsubMessage._from_proto_str(encoded)

    def is_deterministic(self) -> bool:
        return False  # protobuf map (attributes) order is not canonical; values only, never keys

    def to_type_hint(self):
        from apache_beam.io.gcp.pubsub import PubsubMessage

        return PubsubMessage

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


def register() -> None:
    for t in RECORD_TYPES:
        register_record(t)
    beam.coders.registry.register_coder(Timestamp, _coders.TimestampCoder)
    try:
        from apache_beam.io.gcp.pubsub import PubsubMessage
    except ImportError:  # pragma: no cover - apache-beam[gcp] is a dependency
        return
    beam.coders.registry.register_coder(PubsubMessage, PubsubMessageCoder)


register()
