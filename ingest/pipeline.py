"""The unified headwater pipeline: every configured source through the same transforms.

    sources -> ParseEnvelope (decode, validate, mask) -> DropDuplicateEvents
            -> FlattenEvents -> ComputeAggregates -> WriteWarehouse
    every failure anywhere -> AllDeadLetters -> WriteWarehouse (dead-letter table)

Streaming (Pub/Sub, Kafka) and bounded (files, gs://, s3://) inputs share all
steps after the source, so a backfill yields the same rows and aggregates as
the live stream did for the same events.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Mapping, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pvalue import PCollection

from flatten.records import AggregateRow
from ingest.contract import Contract
from ingest.dedup import DropDuplicateEvents
from ingest.flatten_step import FlattenEvents
from ingest.parse import ParseEnvelope
from ingest.sources import ReadSource, source_labels
import state.coders  # noqa: F401  (registers Row coders for the records)
from state.transform import ComputeAggregates

__all__ = ["HeadwaterPipeline", "HeadwaterOutputs", "WriteWarehouse", "build", "run", "run_until_stopped",
           "pipeline_options"]

_LOG = logging.getLogger(__name__)


class HeadwaterOutputs(NamedTuple):
    rows: PCollection  # TableRow; bounded jobs on DuckDB: list[TableRow] (one per batch)
    aggregates: PCollection  # AggregateRow
    dead_letters: PCollection  # DeadLetter


def _never(_element) -> bool:
    return False


def _identity(batch):
    return batch


def _nothing(_element) -> tuple:
    return ()


class HeadwaterPipeline(beam.PTransform):
    """PBegin -> HeadwaterOutputs. The whole unified pipeline up to (not including) the warehouse.

    ``source_overrides`` maps a source label (see ``ingest.sources.source_labels``)
    to a PTransform producing ``PCollection[RawMessage]`` (e.g. ``beam.Create`` or
    ``TestStream``); with ``require_overrides=True`` a configured source left
    without an override is an error, so a test can never reach a real server by accident.
    """

    def __init__(self, contract: Contract, source_overrides: Optional[Mapping[str, beam.PTransform]] = None,
                 require_overrides: bool = False, label: str = "Headwater", recovery=None):
        super().__init__(label)
        self._contract = contract
        self._overrides = dict(source_overrides or {})
        self._require = require_overrides
        self._recovery = recovery  # ingest.recovery.Recovery: state rebuilt from the warehouse (local restart)

    def expand(self, pbegin) -> HeadwaterOutputs:
        contract = self._contract
        if not contract.streaming:
            return self._expand_bounded(pbegin)
        messages: list[PCollection] = []
        dead: list[PCollection] = []
        labels = []
        for partner in contract.partners:
            for label, spec in source_labels(partner):
                labels.append(label)
                if label in self._overrides:
                    messages.append(pbegin | label >> self._overrides.pop(label))
                    continue
                if self._require:
                    raise ValueError(f"source {label!r} has no override but require_overrides=True")
                msgs, dls = pbegin | label >> ReadSource(spec, partner, label)
                messages.append(msgs)
                if dls is not None:
                    dead.append(dls)
        if self._overrides:
            raise ValueError(f"overrides for unknown sources {sorted(self._overrides)}; sources are {labels}")

        raw = messages | "AllMessages" >> beam.Flatten()
        parsed = raw | "ParseEnvelope" >> ParseEnvelope(contract)
        rec = self._recovery
        local = _state_in_this_process(pbegin.pipeline.options)
        specs = {(p.name, a.name): a for p in contract.partners for a in p.aggregates}
        if local and live_batches_enabled() and contract.warehouse.kind == "duckdb":
            return self._expand_live_batches(parsed, dead, local, specs)
        events = parsed.events | "DropDuplicateEvents" >> DropDuplicateEvents(
            window_s=contract.dedup.window_s(), seed=rec.seen if rec else None, local_state=local)
        flat = events | "FlattenEvents" >> FlattenEvents(contract)
        dead += [parsed.dead_letter, flat.dead_letter]
        if specs:
            aggs = flat.aggregate_inputs | "ComputeAggregates" >> ComputeAggregates(
                specs, seed=rec.states if rec else None, local_state=local)
            aggregates = aggs.aggregates
            dead.append(aggs.dead_letter)
        else:  # no partner declares aggregates: no stateful step at all
            aggregates = flat.aggregate_inputs | "NoAggregates" >> beam.Filter(_never)
        dead_letters = dead | "AllDeadLetters" >> beam.Flatten()
        return HeadwaterOutputs(rows=flat.rows, aggregates=aggregates, dead_letters=dead_letters)

    def _expand_live_batches(self, parsed, dead: list, job: str, specs: dict) -> HeadwaterOutputs:
        """The live job in batches (``ingest.live_batches``), where its state lives in this process (Prism with
        LOOPBACK workers) and it writes DuckDB (a local job writing BigQuery keeps the per-key steps: that
        combination has no end-to-end test here). Its steps sit directly under this transform's label;
        ``rows`` are lists of TableRow (one per batch)."""
        from ingest.live_batches import LiveBatches

        contract = self._contract
        _LOG.warning("headwater: %s (HEADWATER_LIVE_BATCHES=0: the per-key steps Dataflow runs)", LIVE_BATCHES_LINE)
        rows, aggregates, dls = LiveBatches(contract, specs, job, recovery=self._recovery).expand(parsed.events)
        if aggregates is None:
            aggregates = parsed.events | "NoAggregates" >> beam.FlatMap(_nothing).with_output_types(AggregateRow)
        dead_letters = [parsed.dead_letter, *dead, *dls] | "AllDeadLetters" >> beam.Flatten()
        return HeadwaterOutputs(rows=rows, aggregates=aggregates, dead_letters=dead_letters)

    def _expand_bounded(self, pbegin) -> HeadwaterOutputs:
        """Only file sources: the batched bounded job (``ingest.bounded``: batches through parse, mask, envelope
        and flatten, dedup in shard groups, aggregates as a lifted combine with one final row per key and window).
        Its ``rows`` are lists of TableRow (one per batch) for DuckDB, single TableRows for BigQuery."""
        from ingest.bounded import BoundedHeadwater

        duck = self._contract.warehouse.kind == "duckdb"
        # expanded in place (not applied as a composite): its steps sit directly under this transform's label
        # (Headwater/Read_<partner>_file_0, Headwater/ProcessBatches, ...), like the streaming job's
        rows, aggregates, dead_letters = BoundedHeadwater(
            self._contract, self._overrides, self._require, keep_rows=not duck).expand(pbegin)
        self._overrides = {}
        if not duck:
            rows = rows | "UnbatchRows" >> beam.FlatMap(_identity)
        return HeadwaterOutputs(rows=rows, aggregates=aggregates, dead_letters=dead_letters)


#: Said once in the log when a job is built with the batched live steps (tests look for it).
LIVE_BATCHES_LINE = "dedup and aggregates run in batches per shard on this local runner (ingest/live_batches.py)"


def live_batches_enabled() -> bool:
    """The local streaming job writing DuckDB runs in batches (``ingest.live_batches``) unless
    ``HEADWATER_LIVE_BATCHES=0`` (the per-key steps, as on Dataflow: for comparisons)."""
    return os.environ.get("HEADWATER_LIVE_BATCHES", "1") != "0"


def _state_in_this_process(options: Optional[PipelineOptions]) -> Optional[str]:
    """A job token when the job's per-key state lives in this process and only this process writes it:
    Prism with LOOPBACK workers (the local streaming runner; Prism keeps state in memory, dies with the job
    and fails the job on a failed bundle), with its splits disabled (``prism_disable_sdf_split``, one bundle
    per key at a time). The stateful steps then mirror their state in-process (``state.mirror``) instead of
    a gRPC round trip per event. None elsewhere (Dataflow, other runners)."""
    import uuid

    from apache_beam.options.pipeline_options import DebugOptions, PortableOptions

    from ingest.runner import _runner_name

    if options is None or _runner_name(options) not in ("PrismRunner", "prism"):
        return None
    if options.view_as(PortableOptions).environment_type != "LOOPBACK":
        return None
    if "prism_disable_sdf_split" not in (options.view_as(DebugOptions).experiments or []):
        return None  # Prism may split a stateful bundle (HEADWATER_PRISM_ALLOW_SPLITS=1): two bundles per key
    return uuid.uuid4().hex


class WriteWarehouse(beam.PTransform):
    """HeadwaterOutputs -> the configured warehouse (DuckDB file or BigQuery)."""

    def __init__(self, contract: Contract, label: str = "WriteWarehouse"):
        super().__init__(label)
        self._contract = contract

    def expand(self, outputs: HeadwaterOutputs):
        c = self._contract
        tables = {p.name: p.table for p in c.partners}
        modes = {p.name: p.flatten.schema_mode for p in c.partners}
        pcolls = {"rows": outputs.rows, "aggregates": outputs.aggregates, "dead_letters": outputs.dead_letters}
        if c.warehouse.kind == "bigquery":
            from sinks.bigquery_sink import WriteToBigQueryWarehouse

            return pcolls | "BigQuery" >> WriteToBigQueryWarehouse(c.warehouse, tables, modes)
        from sinks.duckdb_sink import WriteToDuckDB

        return pcolls | "DuckDB" >> WriteToDuckDB(c.warehouse, tables, modes)


def build(p: beam.Pipeline, contract: Contract, **kwargs) -> HeadwaterOutputs:
    """Apply the whole job (pipeline + warehouse) to ``p``; returns the pre-sink outputs."""
    outputs = p | "Headwater" >> HeadwaterPipeline(contract, **kwargs)
    _ = outputs | "WriteWarehouse" >> WriteWarehouse(contract)
    return outputs


def pipeline_options(contract: Contract, beam_argv: Sequence[str]) -> PipelineOptions:
    """Beam options for this contract: the user's argv plus headwater's defaults for the local runners."""
    from ingest.objectstore import objectstore_options, s3_endpoint

    argv = list(beam_argv)
    if s3_endpoint(os.environ):
        # A local S3 server (AWS_ENDPOINT_URL...): pass it and its keys to Beam's S3 filesystem. Only then:
        # pipeline options are shown on Dataflow's job page, so real keys never travel this way.
        argv += objectstore_options(argv=tuple(argv))
    has_runner = any(a == "--runner" or a.startswith("--runner=") for a in argv)
    if contract.streaming:
        from ingest.runner import runner_options

        argv = runner_options(True, argv)
    elif not has_runner:
        # The portable FnApiRunner is the fastest local batch runner and runs state and timers;
        # naming it skips DirectRunner's attempt to download Prism (this machine class has no internet).
        argv = ["--runner=FnApiRunner", *argv]
    opts = PipelineOptions(argv)
    if contract.streaming:
        opts.view_as(StandardOptions).streaming = True
    return opts


# Local default for the state cache of the in-process (FnApiRunner) worker, in MB. Beam's cache weighs
# every value it stores with objsize, which walks all loaded modules' globals on every put: with 100 MB
# (Beam's default) the demo ran 5.8x slower (129 vs 752 records/s, bench/state_bench.py has the figures).
# The in-process runner's state store is a dict, so the cache saves nothing there. Dataflow ignores this.
LOCAL_STATE_CACHE_MB = 0


def _configure_local_state_cache(argv: Sequence[str]) -> None:
    """Make ``--max_cache_memory_usage_mb`` apply to the FnApiRunner's embedded worker (which otherwise
    hard-codes 100 MB), defaulting to LOCAL_STATE_CACHE_MB."""
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    mb = LOCAL_STATE_CACHE_MB
    for i, a in enumerate(argv):
        if a.startswith("--max_cache_memory_usage_mb="):
            mb = int(a.split("=", 1)[1])
        elif a == "--max_cache_memory_usage_mb" and i + 1 < len(argv):
            mb = int(argv[i + 1])
    worker_handlers.STATE_CACHE_SIZE_MB = mb


def _tune_local_worker(options: PipelineOptions) -> None:
    """A streaming job on Prism with LOOPBACK workers runs its SDK workers in this process: tune it
    (``ingest.runner.tune_local_streaming_worker``). Other runners and environments: nothing."""
    from apache_beam.options.pipeline_options import DebugOptions, PortableOptions

    from ingest.runner import _runner_name, tune_local_streaming_worker

    if _runner_name(options) in ("PrismRunner", "prism") and \
            options.view_as(PortableOptions).environment_type == "LOOPBACK":
        tune_local_streaming_worker(options.view_as(DebugOptions).experiments or [])


def _recovery_for(contract: Contract, options: PipelineOptions):
    """A local streaming job resumes from the warehouse (``ingest.recovery``); elsewhere None
    (Dataflow keeps its state across updates and drains; batch jobs start from nothing)."""
    if not contract.streaming:
        return None
    from ingest.runner import commit_mode

    if commit_mode(options) != "ledger":
        return None
    from ingest.recovery import prepare_recovery

    return prepare_recovery(contract)


def run(contract: Contract, beam_argv: Sequence[str] = (), wait: bool = True):
    """Build and run the job. Returns the PipelineResult (finished when ``wait``)."""
    from ingest.objectstore import configure_gcs_emulator

    _configure_local_state_cache(beam_argv)
    configure_gcs_emulator()  # only when STORAGE_EMULATOR_HOST is set: local gs:// without a credential hunt
    options = pipeline_options(contract, beam_argv)
    if contract.streaming:
        _tune_local_worker(options)
    p = beam.Pipeline(options=options)
    build(p, contract, recovery=_recovery_for(contract, options))
    from ingest.bounded import bounded_settings, defer_rows_writes

    # the local runner runs it here
    with contextlib.nullcontext() if contract.streaming else bounded_settings(
            defer_writes=defer_rows_writes(contract)):
        result = p.run()
        if wait:
            result.wait_until_finish()
    return result


def run_until_stopped(contract: Contract, beam_argv: Sequence[str] = (), stop=None, poll_s: float = 0.5,
                      on_running=None) -> str:
    """Run the job; a bounded job runs to completion, a streaming one until SIGINT/SIGTERM (or ``stop`` is set),
    then is cancelled cleanly. Returns the final state (DONE, CANCELLED, FAILED...)."""
    import signal
    import threading

    from apache_beam.runners.runner import PipelineState

    if not contract.streaming:
        return str(run(contract, beam_argv, wait=True).state)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        result = run(contract, beam_argv, wait=False)
        if previous:
            # Beam's job server installs its own SIGINT handler when it starts (it stops Prism at once,
            # before the job is cancelled, and the SDK worker threads die with tracebacks): ours again.
            for sig in previous:
                signal.signal(sig, lambda *_: stop.set())
        if on_running:
            on_running()
        _LOG.warning("headwater: streaming job running; Ctrl-C (SIGINT) or SIGTERM stops it cleanly")
        while not stop.wait(poll_s):
            if PipelineState.is_terminal(result.state):
                return str(result.state)
        result.cancel()
        for _ in range(int(60 / poll_s)):
            if PipelineState.is_terminal(result.state):
                break
            time.sleep(poll_s)
        return str(result.state)
    finally:
        _end_local_job(stop_runner=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_local_job(stop_runner: bool = True) -> None:
    """After a local streaming job: commit what the warehouse made durable, stop the commit loops and
    forget the ledger. ``stop_runner``: stop the Prism process now (a process that goes on, e.g. a test
    session). Without it Prism stops when this process exits, however it exits (its supervisor,
    ``ingest.runner.supervised_prism``): stopping it first would cut the SDK workers' streams while they
    wind down, and they die with tracebacks."""
    from ingest.runner import stop_local_runners
    from ingest.unbounded import stop_loops
    from sinks import ledger
    from sinks.duckdb_store import release_held
    from ingest.recovery import remove_snapshots
    from state.mirror import forget as forget_mirrors

    try:
        stop_loops(final=True)
    finally:
        remove_snapshots()  # the start-up snapshots of its state (read when its workers started)
        release_held()  # the sink's held write connection: checkpointed, the file free for other processes
        forget_mirrors()  # state.mirror: the job's in-process copies of its state (the live batches' shards too)
        ledger.reset()
        if stop_runner:
            stop_local_runners()
