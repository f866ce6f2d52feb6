"""ReadChunks: an explicit list of chunks -> RawMessages whose event time is in the backfill's range.

It replaces the partner's file source inside the unified pipeline (``source_overrides``), so
every step after the source is the stream's own. Two differences from ``ReadPartnerFiles``:

* the chunks are the wave's list (already listed and checked against the ledger), not a glob;
* ``KeepEventRange`` drops records whose event time is outside ``[start, end)`` *before*
  parsing, counting them (counter ``headwater:backfill_out_of_range``): they are skipped, not
  dead-lettered. It reads only the envelope's event-time locator; a record whose time cannot
  be read passes through, so ParseEnvelope dead-letters it exactly as the stream would.

File-level dead letters (unreadable chunk, line over ``max_payload_bytes``) are exposed as
``.dead_letters`` after expansion: the caller routes them to the warehouse.
"""
from __future__ import annotations

from typing import Optional, Sequence

import apache_beam as beam
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata
from apache_beam.metrics import Metrics

from flatten.records import RawMessage
from ingest.contract import EnvelopeSpec
from ingest.envelope import lookup_path, parse_event_time_us
from ingest.file_source import DEAD_LETTER_TAG, _ReadFileFn

__all__ = ["ReadChunks", "OUT_OF_RANGE_COUNTER"]

OUT_OF_RANGE_COUNTER = "backfill_out_of_range"


def _metadata(chunk: tuple[str, int, float]) -> FileMetadata:
    uri, size, mtime = chunk
    return FileMetadata(uri, size, mtime)


class _KeepEventRangeFn(beam.DoFn):
    """RawMessage -> the same message unless its event time is readable and outside [start, end)."""

    def __init__(self, envelope: EnvelopeSpec, start_us: Optional[int], end_us: Optional[int]):
        self._path = envelope.event_time
        self._fmt = envelope.event_time_format
        self._attr = envelope.event_time[len("attribute:"):] if envelope.event_time.startswith("attribute:") else None
        self._start = start_us
        self._end = end_us
        self._skipped = Metrics.counter("headwater", OUT_OF_RANGE_COUNTER)

    def process(self, msg: RawMessage):
        try:
            if self._attr is not None:
                value = orjson.loads(msg.attributes or b"{}").get(self._attr)
            else:
                value = lookup_path(orjson.loads(msg.payload), self._path)
            us = parse_event_time_us(value, self._fmt)
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError, RecursionError):
            yield msg  # unreadable here: ParseEnvelope decides (a dead letter with its reason)
            return
        if (self._start is not None and us < self._start) or (self._end is not None and us >= self._end):
            self._skipped.inc()
            return
        yield msg


class ReadChunks(beam.PTransform):
    """PBegin -> PCollection[RawMessage] (in range); ``.dead_letters``: PCollection[DeadLetter] of unreadable files/lines.

    ``chunks``: ``(uri, size, mtime_s)`` triples. Bounded; chunks are reshuffled across workers, one chunk
    is read by one worker, its records stay in that stage.
    """

    def __init__(self, chunks: Sequence[tuple[str, int, float]], partner: str, envelope: EnvelopeSpec, fmt: str,
                 start_us: Optional[int], end_us: Optional[int], step: str, label: str = "ReadChunks"):
        super().__init__(label)
        if not chunks:
            raise ValueError("ReadChunks needs at least one chunk")
        self._chunks = [tuple(c) for c in chunks]
        self._partner = partner
        self._envelope = envelope
        self._fmt = fmt
        self._range = (start_us, end_us)
        self._step = step
        self.dead_letters = None

    def expand(self, pbegin):
        read = (
            pbegin
            | "Chunks" >> beam.Create(self._chunks)
            | "ToMetadata" >> beam.Map(_metadata)
            | "ReadMatches" >> fileio.ReadMatches()
            | "ReshuffleFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFileFn(self._partner, self._fmt, self._envelope.max_payload_bytes, self._step))
            .with_outputs(DEAD_LETTER_TAG, main="messages"))
        self.dead_letters = read[DEAD_LETTER_TAG]
        msgs = read.messages
        if self._range != (None, None):
            msgs = msgs | "KeepEventRange" >> beam.ParDo(_KeepEventRangeFn(self._envelope, *self._range))
        # No reshuffle of the records: the bounded job batches them in the same stage (ingest.bounded keeps
        # documents out of shuffles; the local runner holds whatever crosses one in memory). Files are
        # spread across workers above.
        return msgs
