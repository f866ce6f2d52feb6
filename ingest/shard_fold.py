"""The body of the bounded job's FoldShards step, without Beam: dedup of a shard group's events and their fold
into per-key partial aggregates. ``ingest.bounded._FoldShardFn`` runs it in the job's process, or, on a local
run whose dedup blobs are spilled to files, in worker processes (``ingest.fold_worker``), which is why it
imports nothing from Beam.

A shard group is the dedup blobs of one event-id shard: each blob is a pickled ``(partner, [entry])`` (or a
zlib stream of one, or a reference to one in a spill file), an entry ``(event_id, event_time_us, aggs, rows)``
with ``aggs`` = ``[(aggregate index, key, values tuple)]``.
"""
from __future__ import annotations

import hashlib
import pickle
import struct
import time
import zlib
from typing import Any, Iterable, Iterator, Mapping

import orjson

from flatten.records import DeadLetter, Reason
from ingest.batch import metric_columns
from state import aggregate as A
from state import combine as C

__all__ = ["ShardFolder", "SpillReader", "entries", "spill_file", "SPILL_REF", "REF", "AGG_STEP"]

AGG_STEP = "ComputeAggregates/AggregatePerKey"  # the step name in aggregate dead letters (as ComputeAggregates)
#: A dedup blob spilled to a file is replaced by a reference: this prefix (a zlib stream starts with 0x78),
#: then offset and length (little-endian u64, u32), then the file's path.
SPILL_REF = b"HWSPILL\x00"
REF = struct.Struct("<QI")


def entries(blob: bytes) -> tuple:
    """A dedup blob's ``(partner, [entry])``: a pickle (spilled, uncompressed: it starts with pickle's PROTO
    opcode 0x80) or a zlib stream of one (0x78)."""
    return pickle.loads(blob if blob[:1] == b"\x80" else zlib.decompress(blob))


def spill_file(ref: bytes) -> str:
    """The path of the spill file a spill reference points into."""
    return ref[len(SPILL_REF) + REF.size:].decode()


class SpillReader:
    """Resolves blobs that are spill references (``ingest.bounded._Spill``); other blobs are returned as they are."""

    def __init__(self):
        self._files: dict = {}

    def blob(self, blob: bytes) -> bytes:
        if not blob.startswith(SPILL_REF):
            return blob
        offset, length = REF.unpack_from(blob, len(SPILL_REF))
        path = spill_file(blob)
        fh = self._files.get(path)
        if fh is None:
            fh = self._files[path] = open(path, "rb")
        fh.seek(offset)
        data = fh.read(length)
        if len(data) != length:
            raise IOError(f"dedup spill file {path} is short: {len(data)} of {length} bytes at {offset}")
        return data

    def close(self) -> None:
        files, self._files = self._files, {}
        for fh in files.values():
            fh.close()


def event_hash(partner: str, event_id: str) -> int:
    """The first pass's stand-in for an event's identity (only says which events might repeat; consistent
    within one process, which is all the two passes need)."""
    return hash((partner, event_id))


def order(entry: tuple) -> bytes:
    return orjson.dumps(entry[:3], option=orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS)


def sha(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def _plan(spec) -> tuple:
    """(name, plan, values columns, compiled add_event) of one aggregate."""
    plan, cols = A.plan_for(spec), metric_columns(spec)
    return spec.name, plan, cols, C.adder(plan, cols)


class ShardFolder:
    """Folds shard groups into ``partials``: ``{(partner, aggregate, key): partial}`` (state.combine), one per
    key for everything folded since the last ``take()``. ``group`` yields ``("dead", DeadLetter)`` for metric
    type conflicts and, with ``keep_rows``, ``("rows", [TableRow])`` batches of the kept events' rows."""

    def __init__(self, specs: Mapping[str, tuple], keep_rows: bool, clock=time.time):
        self.plans = {p: tuple(_plan(a) for a in aggs) for p, aggs in specs.items()}
        self.keep_rows = keep_rows
        self.clock = clock
        self.partials: dict = {}
        self.dups = 0  # repeated events dropped since the last take()
        self.conflicts = 0  # type-conflict dead letters since the last take()

    def take(self) -> "tuple[dict, int, int]":
        """The partials and counts so far; starts afresh."""
        out = (self.partials, self.dups, self.conflicts)
        self.partials, self.dups, self.conflicts = {}, 0, 0
        return out

    def group(self, blobs: Iterable[bytes], reader: SpillReader) -> Iterator[tuple[str, Any]]:
        """Two passes over the shard group's blobs, so that its events are never all decoded at once (a dict of
        every kept entry took ~620 bytes per event, 390 MB for a 10M-event run's shard; bench/README.md, "Fourth
        pass"): the first collects the hashes of the event ids (a set of ints) and which hashes repeat; the
        second folds each event whose hash did not repeat as it is decoded, and keeps aside only the entries
        whose hash repeated. Those are grouped by their exact (partner, event id), so a hash collision only
        costs a slot here, and the copy kept of a repeated event is the one whose entry sorts first."""
        seen: set = set()
        again: set = set()
        for blob in blobs:
            partner, es = entries(reader.blob(blob))
            for e in es:
                h = event_hash(partner, e[0])
                if h in seen:
                    again.add(h)
                else:
                    seen.add(h)
        del seen
        held: dict = {}  # (partner, event id) -> entry, for the events whose hash repeated
        rows: list = []
        for blob in blobs:
            partner, es = entries(reader.blob(blob))
            for e in es:
                if again and event_hash(partner, e[0]) in again:
                    k = (partner, e[0])
                    other = held.get(k)
                    if other is None:
                        held[k] = e
                        continue
                    self.dups += 1
                    if order(e) < order(other):  # deterministic choice, whatever the arrival order
                        held[k] = e
                    continue
                yield from self._fold(partner, e, rows)
        for (partner, _), e in held.items():
            yield from self._fold(partner, e, rows)
        if rows:
            yield "rows", rows

    def _fold(self, partner: str, entry: tuple, rows: list) -> Iterator[tuple[str, Any]]:
        """Fold one kept event into the partials (and, with ``keep_rows``, its rows into ``rows``, emitted
        every 5,000)."""
        event_id, t_us, aggs, erows = entry
        if erows:
            rows += erows
            if len(rows) >= 5000:
                yield "rows", list(rows)
                rows.clear()
        if not aggs:
            return
        partials = self.partials
        plans = self.plans[partner]
        for i, key, values in aggs:
            name, plan, cols, add = plans[i]
            pk = (partner, name, key)
            part = partials.get(pk)
            if part is None:
                part = partials[pk] = C.new_partial(plan)
            for r in add(part, t_us, event_id, values):  # C.add_event, compiled for the plan (C.adder)
                self.conflicts += 1
                payload = orjson.dumps(dict(zip(cols, values)))
                yield "dead", DeadLetter(
                    partner=partner, source="aggregate", coords=f"{name}:{key}#{event_id}", payload=payload,
                    payload_ref=sha(payload), error_class="TypeConflict", reason=Reason.TYPE_CONFLICT,
                    message=r.message, step=AGG_STEP, event_time_us=t_us,
                    processing_time_us=int(self.clock() * 1_000_000))
