"""The bounded (batch) job in batches: files -> row batches, dead letters and final aggregates.

    Read_<partner>_file_<n> (file -> batches of RawMessage)       Batch_<label> for in-memory overrides
      -> AllMessages -> ProcessBatches (parse + mask + envelope + flatten, one DoFn call per batch)
           rows: list[TableRow] per batch  -> the warehouse (written in the same fused stage)
           dedup: (shard, (partner, [Entry]))  -> DedupEvents (GroupByKey on the event-id shard)
               -> FoldShards (drop repeated (partner, event id), count them, fold each kept event into
                  per-key partial aggregates, one per key per bundle, emitted when the bundle ends; type
                  conflicts -> dead letters)
               -> ComputeAggregates/AggregatePerKey (state.bounded.FinalAggregates: lifted merge,
                  one final row per (key, window))
           dead_letter: DeadLetter

Why this shape (bench/README.md has the figures): Beam's per-element cost is paid per batch, not per
record and step; the documents never cross a shuffle (the local batch runner holds everything that
crosses one in memory, so only the compact per-event dedup entries and the per-key partials do);
dedup needs no per-event state cell (the shard group holds a set).

Duplicates: the first occurrence of a (partner, event id) in a shard group is kept for the aggregates
and counted once; rows need no dedup on DuckDB, whose writes are idempotent per event (a repeated
event has the same main row id; its rows are written with the first copy's, sinks/duckdb_store.py). For BigQuery, whose bounded writes
append, the rows travel with the dedup entries and only the kept copy's rows are written
(``keep_rows``). When two *different* payloads share an event id (not a redelivery: a partner bug)
the copy kept is the one whose entry sorts first, and on DuckDB the rows are those written first;
the per-element pipeline kept whichever arrived first, so neither was deterministic before.
"""
from __future__ import annotations

import contextlib
import gc
import os
import pickle
import sys
import time
import uuid
import zlib
from typing import Iterator, Mapping, Optional

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from flatten.records import RawMessage
from ingest import progress, scratch
from ingest.batch import BatchProcessor
from ingest.contract import Contract, FileSource
from ingest.file_source import DEAD_LETTER_TAG, _ReadFileFn
from ingest.fold_worker import FoldWorker
from ingest.shard_fold import REF, SPILL_REF, ShardFolder, SpillReader, order, spill_file
from ingest.sources import source_labels
from state.bounded import FinalAggregates
from state.spec import AggregateSpec

__all__ = ["BoundedHeadwater", "MessageBatch", "RowBatch", "BATCH_SIZE", "DEDUP_SHARDS", "bounded_settings",
           "defer_rows_writes"]

#: Records per batch: large enough that Beam's per-element cost (~10-30 us) is noise, small enough
#: that a batch's rows stay a few MB.
BATCH_SIZE = 1000
#: Dedup groups. Each holds the ids of ~1/DEDUP_SHARDS of the events at once; on Dataflow they are
#: also the fold's parallelism.
DEDUP_SHARDS = 16
DEDUP_TAG = "dedup"
ROWS_TAG = "rows"
#: Fold the shard groups in worker processes where the dedup blobs are spill files (_FoldShardFn).
FOLD_IN_WORKER = True
#: How many fold workers a bundle of shard groups is spread over (a group is folded by one worker, whole, so
#: dedup stays exact; a key folded by several has a partial from each, merged by the combine). One: a key's
#: events are in every shard, so each worker holds a partial of nearly every key (10M events, 200,000 keys:
#: ~450 MB per worker); two on 2 CPUs were 4 % faster at 1M events and 20,000 keys but took a 10M-event run
#: past 1.5 GB (bench/README.md, "Sixth pass"). More pays where CPUs are many and keys few.
FOLD_WORKERS = 1


#: Python's cyclic collector while a bounded job runs in this process: a generation-0 pass every GC_GEN0
#: allocations instead of 700. The job allocates millions of short-lived acyclic objects (freed by their
#: reference counts) while the local runner holds millions of long-lived ones (the batches and dedup entries
#: between stages), and each young pass that promotes objects leads to older passes over all of them: with
#: the defaults the collector took ~20 % of the bounded job's CPU (bench/README.md, "Whole job").
GC_THRESHOLDS = (50_000, 20, 100)
#: The interpreter's thread switch interval (seconds) while a bounded job runs in this process. The sink's
#: writer thread needs the GIL back after every DuckDB statement (DuckDB releases it while it works); with
#: Python's default 5 ms each hand-back waited up to 5 ms behind the pipeline thread, so the writer, the
#: bounded job's slowest part, spent more time waiting than working (bench/README.md).
SWITCH_INTERVAL_S = 0.0005


@contextlib.contextmanager
def bounded_settings(thresholds: tuple = GC_THRESHOLDS, switch_s: float = SWITCH_INTERVAL_S,
                     defer_writes: bool = False) -> Iterator[None]:
    """Run a bounded job in this process with the collector's thresholds raised and a short thread switch
    interval; ``defer_writes`` (a job with aggregates: ``defer_rows_writes``): its DuckDB rows writes deferred
    (``sinks.duckdb_sink.deferred_writes``: leaving waits for them and raises a failed one). The previous
    settings are restored after, spill files removed."""
    from sinks.duckdb_sink import deferred_writes

    before, interval = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(*(max(a, b) for a, b in zip(thresholds, before)))
    sys.setswitchinterval(min(switch_s, interval))
    try:
        with deferred_writes() if defer_writes else contextlib.nullcontext():
            yield
    finally:
        gc.set_threshold(*before)
        sys.setswitchinterval(interval)
        remove_spills()


def defer_rows_writes(contract: Contract) -> bool:
    """Whether a local bounded run of ``contract`` defers its rows writes: only with aggregates. The rows
    stage then ends ~20 % sooner and the fold (in its worker process) runs while the writer catches up; a
    1M-event run took 31.7-33.7 s against 34.6-34.9. Without aggregates nothing follows the rows stage and
    the writer is the run's length: deferring only adds the spill files' cost (24.7-24.9 s against 22.7;
    bench/README.md, "Sixth pass")."""
    return any(p.aggregates for p in contract.partners)


class MessageBatch(list):
    """A list of RawMessage: one element of the bounded job's message stream."""


class RowBatch(list):
    """A list of TableRow: one element of the bounded job's row stream (the DuckDB sink takes lists)."""


class _BatchCoder(beam.coders.Coder):
    """Pickle for a batch that crosses a stage boundary (they are built to stay inside one), and a size
    estimate that does not encode it: Beam samples elements for its size counters, and encoding a whole
    batch per sample cost ~3 % of the job (bench/README.md, profile)."""

    def _create_impl(self):
        return beam.coders.coder_impl.CallbackCoderImpl(
            lambda x: pickle.dumps(list(x), pickle.HIGHEST_PROTOCOL), pickle.loads, size_estimator=_batch_size)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return list


def _batch_size(batch) -> int:
    return 512 * len(batch)


beam.coders.registry.register_coder(MessageBatch, _BatchCoder)
beam.coders.registry.register_coder(RowBatch, _BatchCoder)


class _ReadFileBatchesFn(_ReadFileFn):
    """``ReadPartnerFiles``' reader, its records grouped into lists of up to ``batch`` RawMessages."""

    def __init__(self, partner: str, fmt: str, max_line_bytes: int, step: str, batch: int):
        super().__init__(partner, fmt, max_line_bytes, step)
        self._batch = batch

    def process(self, rf: fileio.ReadableFile) -> Iterator:
        buf = MessageBatch()
        for out in super().process(rf):
            if isinstance(out, RawMessage):
                buf.append(out)
                if len(buf) >= self._batch:
                    yield buf
                    buf = MessageBatch()
            else:
                yield out  # a TaggedOutput dead letter
        if buf:
            yield buf


class _ReadFileBatches(beam.PTransform):
    """PBegin -> (PCollection[list[RawMessage]], PCollection[DeadLetter]). One file is read by one worker."""

    def __init__(self, spec: FileSource, partner: str, max_line_bytes: int, step: str, batch: int):
        super().__init__()
        self._args = (spec, partner, max_line_bytes, step, batch)

    def expand(self, pbegin):
        spec, partner, max_bytes, step, batch = self._args
        read = (
            pbegin
            | "Match" >> fileio.MatchFiles(spec.pattern, empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW_IF_WILDCARD)
            | "ReadMatches" >> fileio.ReadMatches()
            | "ReshuffleFiles" >> beam.Reshuffle()
            | "ReadBatches" >> beam.ParDo(_ReadFileBatchesFn(partner, spec.format, max_bytes, step, batch))
            .with_output_types(MessageBatch).with_outputs(DEAD_LETTER_TAG, main="batches")
        )
        return read.batches, read[DEAD_LETTER_TAG]


class _ProcessBatchFn(beam.DoFn):
    def __init__(self, contract: Contract, keep_rows: bool, shards: int, spill_dir: Optional[str] = None):
        self._contract = contract
        self._keep_rows = keep_rows
        self._shards = shards
        self._spill_dir = spill_dir  # local runners: dedup blobs go to files, references cross the shuffle
        self._events = Metrics.counter("headwater", "events_parsed")
        self._rows = Metrics.counter("headwater", "rows_flattened")
        self._dead = Metrics.counter("headwater", "dead_letters_parse_flatten")
        self._py_env = Metrics.counter("headwater", "envelope_python_path_events")
        self._py_flat = Metrics.counter("headwater", "flatten_python_path_events")
        self._nokey = Metrics.counter("headwater", "aggregate_key_missing")

    def setup(self) -> None:
        self._proc = BatchProcessor(self._contract, keep_rows=self._keep_rows)
        self._spill = _Spill(self._spill_dir) if self._spill_dir else None

    def finish_bundle(self) -> None:
        if self._spill is not None:
            self._spill.flush()  # the references this bundle emitted point at bytes on disk before it commits

    def teardown(self) -> None:
        spill = getattr(self, "_spill", None)
        if spill is not None:
            spill.close()

    def process(self, batch: list) -> Iterator:
        if not batch:
            return
        partner = batch[0].partner
        if any(m.partner != partner for m in batch):  # in-memory overrides may mix partners: one at a time
            by: dict[str, list] = {}
            for m in batch:
                by.setdefault(m.partner, []).append(m)
            for sub in by.values():
                yield from self.process(sub)
            return
        progress.count_parsed(len(batch))
        res = self._proc.process(batch)
        self._events.inc(len(res.entries))
        if res.python_envelope:
            self._py_env.inc(res.python_envelope)
        if res.python_flatten:
            self._py_flat.inc(res.python_flatten)
        if res.key_missing:
            self._nokey.inc(res.key_missing)
        if res.rows:
            self._rows.inc(len(res.rows))
            yield RowBatch(res.rows)
        if res.dead:
            self._dead.inc(len(res.dead))
            for d in res.dead:
                Metrics.counter("headwater", f"dead_letter_{d.reason}").inc()
                yield TaggedOutput(DEAD_LETTER_TAG, d)
        if res.entries:
            n = self._shards
            groups: dict[int, list] = {}
            for e in res.entries:
                groups.setdefault(zlib.crc32(e.event_id.encode()) % n, []).append(tuple(e))
            for shard, group in groups.items():
                # One blob per (batch, shard): Beam codes bytes without looking inside. Compressed (ids and keys
                # share long prefixes): the local runner holds every blob in memory until the shard groups run.
                # Spilled blobs stay uncompressed (the file is not held in memory; compressing, then decompressing
                # in both of the fold's passes, took ~7 % of a 1M-event run's pipeline thread): ``_entries`` tells.
                blob = pickle.dumps((partner, group), protocol=pickle.HIGHEST_PROTOCOL)
                if self._spill is None:
                    yield TaggedOutput(DEDUP_TAG, (shard, zlib.compress(blob, 1)))
                else:
                    yield TaggedOutput(DEDUP_TAG, (shard, self._spill.put(shard, blob)))


class _FoldShardFn(beam.DoFn):
    """(shard, [pickled (partner, [Entry tuple])]) -> ((partner, aggregate, key), partial) + type-conflict dead letters
    (+ the kept events' rows in batches, with ``keep_rows``). The fold itself is ``ingest.shard_fold``; where
    the blobs are spill references (local runs) and rows are not kept, ``FOLD_WORKERS`` worker processes run it
    (``ingest.fold_worker``: the fold then runs beside this process's rows writer instead of taking turns
    with it for the interpreter's lock)."""

    def __init__(self, specs: Mapping[str, tuple], keep_rows: bool, clock=time.time):
        self._specs = dict(specs)  # partner -> tuple of AggregateSpec, in contract order
        self._keep_rows = keep_rows
        self._clock = clock
        self._dups = Metrics.counter("headwater", "duplicate_events")
        self._conflicts = Metrics.counter("headwater.state", "dead_letter_other")

    def setup(self) -> None:
        self._folder = ShardFolder(self._specs, self._keep_rows, self._clock)
        self._workers: list[FoldWorker] = []
        self._queued: list[int] = []  # blobs sent to each worker this bundle

    def start_bundle(self) -> None:
        # One partial per (partner, aggregate, key) for the whole bundle, not per shard group: a key's events
        # are spread over every shard (shards are by event id), and the combine's lifted pre-merge keeps at
        # most 100,000 keys, so per-shard partials crossed the shuffle up to once per shard (15 per key at
        # 200,000 users; bench/README.md, "Third pass"). Folding is order-independent (state/combine.py).
        self._folder.take()

    def finish_bundle(self) -> Iterator:
        ts = GlobalWindow().max_timestamp()  # what the shard groups carried (GroupByKey's output, global window)
        workers, self._workers = self._workers, []
        if workers:
            try:
                for w in workers:  # every worker finishes its queue at once; then each result is read
                    w.end()
                results = [w.result() for w in workers]
            finally:
                for w in workers:  # ended before their partials are read (from their files): memory back first
                    w.close()
            for pairs, dups, conflicts, dead in results:
                self._count(dups, conflicts)
                for d in dead:
                    yield TaggedOutput(DEAD_LETTER_TAG, WindowedValue(d, ts, (GlobalWindow(),)))
                # a key folded by several workers has one partial from each: the combine merges them
                for pk, part in pairs:
                    yield WindowedValue((pk, part), ts, (GlobalWindow(),))
            return
        partials, _, _ = self._folder.take()
        for pk, part in partials.items():
            yield WindowedValue((pk, part), ts, (GlobalWindow(),))

    def teardown(self) -> None:
        workers, self._workers = getattr(self, "_workers", []), []
        for w in workers:  # a failed bundle: no process is left behind
            w.close()

    def process(self, element) -> Iterator:
        _, groups = element
        if not self._workers and FOLD_IN_WORKER and not self._keep_rows:
            first = next(iter(groups), b"")
            if first.startswith(SPILL_REF):  # the workers read the spill files themselves
                # their partials come back through files beside the spill files (removed when read, or with the
                # spill directory when the run ends)
                where = os.path.dirname(spill_file(first))
                self._workers = [FoldWorker(self._specs, os.path.join(where, f"partials-{uuid.uuid4().hex}.bin"))
                                 for _ in range(FOLD_WORKERS)]
                self._queued = [0] * len(self._workers)
        if self._workers:
            blobs = list(groups)
            i = self._queued.index(min(self._queued))  # the least loaded worker takes the whole group
            self._workers[i].group(blobs)
            self._queued[i] += len(blobs)
            return
        reader = SpillReader()
        try:
            for kind, value in self._folder.group(groups, reader):
                yield TaggedOutput(ROWS_TAG if kind == "rows" else DEAD_LETTER_TAG,
                                   RowBatch(value) if kind == "rows" else value)
        finally:
            reader.close()
        f = self._folder
        self._count(f.dups, f.conflicts)
        f.dups = f.conflicts = 0

    def _count(self, dups: int, conflicts: int) -> None:
        if dups:
            self._dups.inc(dups)
            progress.count_duplicate(dups)
        if conflicts:
            self._conflicts.inc(conflicts)


_SPILL_REF, _REF = SPILL_REF, REF  # a spilled blob's reference (ingest.shard_fold)


class _Spill:
    """Appends dedup blobs to one file per shard (per DoFn instance) and returns references to them.

    Why: the local runners hold what crosses a shuffle in memory, and Beam's FnApiRunner encodes a grouped
    buffer whole before the next stage reads it (``GroupingBuffer.partition``: the table, the output stream
    and its copy at once), so at 10M events the ~28 bytes per event of dedup blobs became ~1 GB at the
    fold (bench/README.md, "Fourth pass"). References are ~80 bytes per blob of ~60 events. Only where the
    job's workers share this machine's disk (``BoundedHeadwater``'s ``spill``); on Dataflow the blobs
    cross the shuffle themselves."""

    def __init__(self, root: str):
        self._root = root
        self._files: dict = {}
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def put(self, shard: int, blob: bytes) -> bytes:
        fh = self._files.get(shard)
        if fh is None:
            os.makedirs(self._root, exist_ok=True)
            path = os.path.join(self._root, f"shard-{shard}-{self._tag}.bin")
            fh = self._files[shard] = open(path, "ab")
        offset = fh.tell()
        fh.write(blob)
        return _SPILL_REF + _REF.pack(offset, len(blob)) + fh.name.encode()

    def flush(self) -> None:
        for fh in self._files.values():
            fh.flush()

    def close(self) -> None:
        files, self._files = self._files, {}
        for fh in files.values():
            fh.close()


def spill_dir() -> str:
    """A new spill directory for a bounded job of this process, removed by ``remove_spills`` (after the run).
    Directories left by processes that no longer run (killed: no cleanup ran) are removed first."""
    return scratch.new_dir("spill", create=False)  # made by the first blob written (_Spill.put)


def remove_spills() -> None:
    """Remove this process's spill directories (``bounded_settings`` calls it when a bounded run ends)."""
    scratch.remove_mine("spill")


#: Runners whose workers run on this machine (in this process or its children) and hold shuffled data in
#: this process's memory: the bounded job spills its dedup blobs to local files there.
LOCAL_RUNNERS = frozenset({"DirectRunner", "SwitchingDirectRunner", "FnApiRunner"})


def _local_runner(options) -> bool:
    from ingest.runner import _runner_name

    name = _runner_name(options) if options is not None else None
    return name is None or name in LOCAL_RUNNERS


_order = order  # the kept copy of a repeated event: the entry that sorts first (ingest.shard_fold)


class BoundedHeadwater(beam.PTransform):
    """PBegin -> (rows, aggregates, dead letters) for a contract whose sources are all files.

    ``rows`` is a PCollection of *lists* of TableRow (one per batch): the DuckDB sink writes them as
    they come; ``keep_rows`` (BigQuery) makes them the kept copies of deduplicated events instead.
    ``source_overrides`` as for ``ingest.pipeline.HeadwaterPipeline`` (PCollection[RawMessage] producers).
    """

    def __init__(self, contract: Contract, source_overrides: Mapping[str, beam.PTransform], require_overrides: bool,
                 keep_rows: bool = False, batch_size: int = BATCH_SIZE, shards: int = DEDUP_SHARDS,
                 label: str = "Bounded", spill: Optional[bool] = None):
        super().__init__(label)
        if contract.streaming:
            raise ValueError("BoundedHeadwater runs contracts without streaming sources")
        self._contract = contract
        self._overrides = dict(source_overrides)
        self._require = require_overrides
        self._keep_rows = keep_rows
        self._batch = batch_size
        self._shards = shards
        self._spill = spill  # dedup blobs to local files (_Spill); None: where the runner runs in this machine

    def expand(self, pbegin):
        contract = self._contract
        batches, dead, labels = [], [], []
        for partner in contract.partners:
            for label, spec in source_labels(partner):
                labels.append(label)
                if label in self._overrides:
                    msgs = pbegin | label >> self._overrides.pop(label)
                    batches.append(msgs | f"Batch_{label}" >> beam.BatchElements(
                        min_batch_size=self._batch, max_batch_size=self._batch)
                        | f"AsBatch_{label}" >> beam.Map(MessageBatch).with_output_types(MessageBatch))
                    continue
                if self._require:
                    raise ValueError(f"source {label!r} has no override but require_overrides=True")
                b, d = pbegin | label >> _ReadFileBatches(spec, partner.name, partner.envelope.max_payload_bytes,
                                                          step=label, batch=self._batch)
                batches.append(b)
                dead.append(d)
        if self._overrides:
            raise ValueError(f"overrides for unknown sources {sorted(self._overrides)}; sources are {labels}")
        raw = batches | "AllMessages" >> beam.Flatten()
        raw.element_type = MessageBatch
        spill = self._spill if self._spill is not None else _local_runner(pbegin.pipeline.options)
        out = raw | "ProcessBatches" >> beam.ParDo(_ProcessBatchFn(
            contract, self._keep_rows, self._shards, spill_dir() if spill else None)).with_output_types(RowBatch).with_outputs(
            DEDUP_TAG, DEAD_LETTER_TAG, main=ROWS_TAG)
        specs = {p.name: tuple(p.aggregates) for p in contract.partners}
        out[DEDUP_TAG].element_type = beam.typehints.KV[int, bytes]  # deterministic key coder (VarInt), bytes values
        folded = (out[DEDUP_TAG]
                  | "DedupEvents" >> beam.GroupByKey()
                  | "FoldShards" >> beam.ParDo(_FoldShardFn(specs, self._keep_rows))
                  .with_outputs(ROWS_TAG, DEAD_LETTER_TAG, main="partials"))
        dead += [out[DEAD_LETTER_TAG], folded[DEAD_LETTER_TAG]]
        # Consumed directly (no Flatten with another stage's output), so the sink is fused with
        # ProcessBatches and row batches never leave the stage that made them.
        rows = folded[ROWS_TAG] if self._keep_rows else out[ROWS_TAG]
        rows.element_type = RowBatch
        agg_specs: dict[tuple[str, str], AggregateSpec] = {(p.name, a.name): a for p in contract.partners
                                                          for a in p.aggregates}
        if agg_specs:
            aggregates = folded.partials | "ComputeAggregates" >> _Aggregates(agg_specs)
        else:
            aggregates = folded.partials | "NoAggregates" >> beam.Filter(_never)
        dead_letters = dead | "AllDeadLetters" >> beam.Flatten()
        return rows, aggregates, dead_letters


class _Aggregates(beam.PTransform):
    def __init__(self, specs):
        super().__init__()
        self._specs = specs

    def expand(self, partials):
        return partials | "AggregatePerKey" >> FinalAggregates(self._specs, partials=True)


def _never(_element) -> bool:
    return False

