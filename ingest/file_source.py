"""ReadPartnerFiles: a bounded glob (local, gs://, s3://) of JSONL, JSONL.gz or Avro -> RawMessage.

Lines are kept as raw bytes: decoding (and bad UTF-8) is ParseEnvelope's job,
so a hostile file yields dead letters, never a crash. Files are read through
Beam's filesystems, so object stores work the same as local paths.
"""
from __future__ import annotations

import datetime as _dt
import decimal
import lzma
import zlib
import time
import uuid
from typing import Any, Iterator

import apache_beam as beam
import orjson
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from flatten.records import DeadLetter, RawMessage, Reason
from ingest.contract import FileSource
from ingest.lines import split_line_chunks

__all__ = ["ReadPartnerFiles", "DEAD_LETTER_TAG"]

DEAD_LETTER_TAG = "dead_letter"
# What a corrupt or truncated file raises from gzip/zlib/lzma/bz2 or fastavro: terminal for that file.
_READ_ERRORS = (OSError, EOFError, ValueError, StopIteration, KeyError, IndexError, zlib.error, lzma.LZMAError)


def _avro_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return obj.decode("latin-1")
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, (_dt.date, _dt.time)):
        return obj.isoformat()
    raise TypeError(f"cannot encode {type(obj).__name__}")


#: The bytes ``bytes.strip`` removes: a line starting with none of them is not blank (no strip, no copy).
_SPACE = frozenset(b" \t\n\r\x0b\x0c")
_new = tuple.__new__  # a NamedTuple's own __new__ is a Python function: per record it shows in profiles


def _is_avro(path: str, fmt: str) -> bool:
    return fmt == "avro" or (fmt == "auto" and path.lower().endswith(".avro"))


class _ReadFileFn(beam.DoFn):
    def __init__(self, partner: str, fmt: str, max_line_bytes: int, step: str):
        self._partner = partner
        self._fmt = fmt
        self._max = max_line_bytes
        self._step = step
        self._lines = Metrics.counter("headwater", "file_records")
        self._blank = Metrics.counter("headwater", "file_blank_lines")
        self._bad = Metrics.counter("headwater", "dead_letters_file")

    def _dead(self, coords: str, reason: str, exc_class: str, message: str) -> beam.pvalue.TaggedOutput:
        self._bad.inc()
        return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(
            partner=self._partner, source="file", coords=coords, payload=b"", payload_ref="",
            error_class=exc_class, reason=reason, message=message, step=self._step, event_time_us=None,
            processing_time_us=int(time.time() * 1_000_000)))

    def process(self, rf: fileio.ReadableFile) -> Iterator[Any]:
        path = rf.metadata.path
        mtime_us = int((rf.metadata.last_updated_in_seconds or 0) * 1_000_000)
        where = f"file:{path}"
        try:
            if _is_avro(path, self._fmt):
                yield from self._avro(rf, path, mtime_us)
            else:
                yield from self._jsonl(rf, path, mtime_us)
        except _READ_ERRORS as exc:
            # Corrupt gzip/avro or a read failure after N good records: the good
            # ones are already out; the rest of the file is one dead letter.
            yield self._dead(where, Reason.BAD_FILE, type(exc).__name__, f"cannot read {path}: {exc}"[:1000])

    def _jsonl(self, rf, path: str, mtime_us: int):
        partner, prefix, max_bytes, good = self._partner, f"file:{path}:", self._max, 0
        with rf.open(compression_type=CompressionTypes.AUTO) as fh:
            try:
                for lineno, items in split_line_chunks(fh, max_bytes):
                    for item in items:
                        if type(item) is int:
                            yield self._dead(f"{prefix}{lineno}", Reason.TOO_LARGE, "LineTooLarge",
                                             f"line is {item} bytes, limit max_payload_bytes={max_bytes}")
                        elif not item or (item[0] in _SPACE and not item.strip()):
                            # every line is accounted for: a blank line is a dead letter (and in the reconciliation)
                            self._blank.inc()
                            line = item.rstrip(b"\r")
                            yield self._dead(f"{prefix}{lineno}", Reason.EMPTY_LINE, "EmptyLine",
                                             f"line {lineno} is empty ({len(line)} whitespace bytes)")
                        else:
                            good += 1
                            yield _new(RawMessage, (partner, "file", f"{prefix}{lineno}", item.rstrip(b"\r"), b"{}",
                                                    mtime_us))
                        lineno += 1
            finally:
                self._lines.inc(good)  # counted once per file, not per line (a Beam counter update per call)

    def _avro(self, rf, path: str, mtime_us: int):
        import fastavro

        with rf.open(compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            for i, record in enumerate(fastavro.reader(fh), start=1):
                coords = f"file:{path}#{i}"
                try:
                    payload = orjson.dumps(record, default=_avro_default)
                except TypeError as exc:
                    yield self._dead(coords, Reason.BAD_FILE, "TypeError", f"avro record not JSON-encodable: {exc}")
                    continue
                self._lines.inc()
                yield RawMessage(self._partner, "file", coords, payload, b"{}", mtime_us)


class ReadPartnerFiles(beam.PTransform):
    """PBegin -> DoOutputsTuple(messages=PCollection[RawMessage], dead_letter=PCollection[DeadLetter]).

    Bounded. One file is read by one worker; records are then reshuffled so the
    rest of the pipeline runs in parallel regardless of file sizes.
    """

    def __init__(self, spec: FileSource, partner: str, max_line_bytes: int, step: str,
                 label: str = "ReadPartnerFiles"):
        super().__init__(label)
        self._step = step
        self._spec = spec
        self._partner = partner
        self._max = max_line_bytes

    def expand(self, pbegin):
        read = (
            pbegin
            | "Match" >> fileio.MatchFiles(self._spec.pattern,
                                          empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW_IF_WILDCARD)
            | "ReadMatches" >> fileio.ReadMatches()
            | "ReshuffleFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFileFn(self._partner, self._spec.format, self._max, self._step))
            .with_output_types(RawMessage, **{DEAD_LETTER_TAG: DeadLetter})
            .with_outputs(DEAD_LETTER_TAG, main="messages")
        )
        messages = read.messages | "Reshuffle" >> beam.Reshuffle()
        return messages, read[DEAD_LETTER_TAG]
