"""Schema (Row) coders for the typed records between stages.

``flatten.records`` is pure Python; this registers Beam's RowCoder for each
record type so every PCollection of them, and every stateful step's input,
uses a portable, deterministic schema coder instead of pickle. Imported by
``ingest.pipeline`` (and any module that builds steps from these records).
"""
from __future__ import annotations

import apache_beam as beam

from flatten.records import AggregateInput, AggregateRow, DeadLetter, Event, RawMessage, TableRow

__all__ = ["RECORD_TYPES", "register"]

RECORD_TYPES = (RawMessage, Event, TableRow, AggregateInput, AggregateRow, DeadLetter)


def register() -> None:
    for t in RECORD_TYPES:
        beam.coders.registry.register_coder(t, beam.coders.RowCoder)


register()
