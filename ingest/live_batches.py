"""The live job in batches on the local streaming runner (issue 13): dedup, flatten and aggregates per shard.

On Prism every element that crosses a stateful step costs Beam's per-element path twice (the data plane out
and back) plus its state requests and timers; the live job paid that per event for dedup (one cell and one
timer per event id) and again per aggregate input. Measured (bench/README.md, "Seventh pass"): with the state
requests of both steps removed the job still ran at ~2,000 events/s, so the per-element path itself was the
bound. Here the elements are batches:

    ParseEnvelope -> BatchEvents: one (dedup shard, [events]) per shard per bundle
                  -> DropDuplicateEvents: per shard, the seen ids            -> [events]
                  -> FlattenEvents: rows as one list per batch, (aggregate shard, [inputs]) per shard
                  -> ComputeAggregates: per shard, every key's AggState and timers

Semantics are the per-key steps' own: the dedup shard keeps each id until ``arrival_expiry`` (rounded up to
the next second, so at least as long), drops redeliveries and ids the warehouse already holds (``seed``) and
resolves them in the commit ledger; the aggregate shard runs ``state.transform._AggregateCore`` unchanged for
each input and each timer, with each key's timers kept in the shard (:class:`_AggShard`) and one Beam timer
per domain per shard set to the earliest of them. Each key's timers fire in time order with their own times,
as the runner fires per-key timers.

**State.** Each shard's state is Beam state: a bag holding a log of what changed, appended once per batch
(the seen ids with their expiry; the touched keys' ``AggState`` bytes) and compacted when it holds twice what
is live. This process keeps the decoded state of the shards it runs (Prism with LOOPBACK workers: every
bundle runs here and Prism fails the job on a failed bundle, the condition ``state.mirror`` already relies
on), so the log is only read when a shard is not in memory; the tests (``tests/ingest/test_live_batches.py``,
``tests/ingest/test_dedup.py``) also run with nothing kept in memory between bundles, every bundle replaying its
shard from the log, and get the same results. Used only where ``ingest.pipeline`` finds the state in this
process and the warehouse is DuckDB; Dataflow keeps the per-key steps (per-key state scales there; their names
and layout are what ``deploy check`` guards).
"""
from __future__ import annotations

import heapq
import time
import zlib
from typing import Any, Callable, Iterator, Optional, Tuple

import apache_beam as beam
import orjson
from apache_beam.coders import BytesCoder
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from flatten.records import AggregateRow, DeadLetter, Event, TableRow
from ingest.dedup import arrival_expiry, dedup_key, drop_duplicate
from ingest.flatten_step import AGGREGATE_TAG, DEAD_LETTER_TAG, _FlattenFn
from state import aggregate as A
from state.mirror import held, hold
from state.transform import AggKey, _AggregateCore

__all__ = ["LiveBatches", "SHARDS"]

#: Shards per stateful step. Each is one key of the runner: one batch per shard per bundle crosses it.
SHARDS = 4
_SECOND_US = 1_000_000
_MAX_US = int(GlobalWindow().max_timestamp().micros)


def _shard(text: str) -> int:
    return zlib.crc32(text.encode()) % SHARDS  # stable across processes (hash() is salted per process)


# In-process shard state (Prism LOOPBACK: every bundle runs in this process) is kept with the job's other
# in-process state (state.mirror.hold, keyed "shard<n>"); state.mirror.forget drops it when the job ends.


# -- BatchEvents ------------------------------------------------------------------------------------------
class _BatchFn(beam.DoFn):
    """Event -> one ``(shard, [(event, element timestamp us)])`` per dedup shard per bundle."""

    def start_bundle(self):
        self._buf: dict[int, list] = {}
        self._min: dict[int, int] = {}

    def process(self, event: Event, ts=beam.DoFn.TimestampParam):
        s = _shard(dedup_key(event.partner, event.event_id))
        us = ts.micros
        buf = self._buf.get(s)
        if buf is None:
            self._buf[s] = [(event, us)]
            self._min[s] = us
        else:
            buf.append((event, us))
            if us < self._min[s]:
                self._min[s] = us

    def finish_bundle(self):
        for s, buf in self._buf.items():
            yield WindowedValue((s, buf), Timestamp(micros=self._min[s]), (GlobalWindow(),))
        self._buf, self._min = {}, {}


# -- DropDuplicateEvents ----------------------------------------------------------------------------------
class _SeenShard:
    """The seen ids of one dedup shard: id -> expiry (watermark us), a heap of expiries, the log's length."""

    __slots__ = ("ids", "heap", "logged", "armed")

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.heap: list = []
        self.logged = 0  # entries in the Beam state log
        self.armed: Optional[int] = None  # the GC timer's time as set (None: not set)

    def add(self, key: str, expiry: int) -> None:
        self.ids[key] = expiry
        heapq.heappush(self.heap, (expiry, key))

    def expire(self, t_us: int) -> int:
        n = 0
        heap, ids = self.heap, self.ids
        while heap and heap[0][0] <= t_us:
            exp, key = heapq.heappop(heap)
            if ids.get(key) == exp:
                del ids[key]
                n += 1
        return n

    def earliest(self) -> Optional[int]:
        return self.heap[0][0] if self.heap else None


class _DedupShardFn(beam.DoFn):
    """(shard, [(event, ts us)]) -> [kept events]; see the module docstring."""

    LOG = BagStateSpec("hw_seen_log", BytesCoder())
    GC = TimerSpec("hw_seen_gc", TimeDomain.WATERMARK)

    def __init__(self, window_s: float, job: str, step: str, seed=None, clock: Callable[[], float] = time.time):
        self._window_s = window_s
        self._job, self._step = job, step
        self._seed = seed
        self._clock = clock
        self._dups = Metrics.counter("headwater", "duplicate_events")

    def setup(self):
        if self._seed is not None:
            self._seed.load()

    def _shard_state(self, shard: int, log) -> _SeenShard:
        st = held(self._job, self._step, f"shard{shard}")
        if st is None:  # not in this process: replay the shard's log
            st = _SeenShard()
            for blob in log.read():
                for key, exp in orjson.loads(blob):
                    if key:
                        st.add(key, exp)
                    else:  # a GC firing at watermark ``exp``: what expired by then is gone
                        st.expire(exp)
                    st.logged += 1
            hold(self._job, self._step, f"shard{shard}", st)
        return st  # type: ignore[return-value]

    def _arm(self, st: _SeenShard, gc) -> None:
        t = st.earliest()
        if t is not None and t != st.armed:
            gc.set(Timestamp(micros=min(t, _MAX_US)))
            st.armed = t

    def _compact(self, st: _SeenShard, log) -> None:
        if st.logged > 2 * len(st.ids) + 4096:
            log.clear()
            log.add(orjson.dumps([[k, e] for k, e in st.ids.items()]))
            st.logged = len(st.ids)

    def process(self, element, log=beam.DoFn.StateParam(LOG), gc=beam.DoFn.TimerParam(GC)):
        shard, batch = element
        st = self._shard_state(shard, log)
        now_s = self._clock()
        kept, new = [], []
        seed = self._seed
        for event, us in batch:
            key = dedup_key(event.partner, event.event_id)
            if key in st.ids:
                self._drop(event)
                continue
            exp = -(-arrival_expiry(Timestamp(micros=us), now_s, self._window_s).micros // _SECOND_US) * _SECOND_US
            st.add(key, exp)
            new.append([key, exp])
            if seed is not None and seed.take(key):
                self._drop(event)
                continue
            kept.append(event)
        if new:
            log.add(orjson.dumps(new))
            st.logged += len(new)
            self._compact(st, log)
            self._arm(st, gc)
        if kept:
            yield kept

    def _drop(self, event: Event) -> None:
        drop_duplicate(self._dups, event)

    @on_timer(GC)
    def _gc(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam, log=beam.DoFn.StateParam(LOG),
            gc=beam.DoFn.TimerParam(GC)):
        st = self._shard_state(key, log)
        st.armed = None  # this firing consumed the timer
        if st.expire(ts.micros):
            log.add(orjson.dumps([["", ts.micros]]))  # replayed as the same expiry (no id is empty: dedup_key)
            st.logged += 1
        self._compact(st, log)
        self._arm(st, gc)


# -- FlattenEvents ----------------------------------------------------------------------------------------
class _FlattenBatchFn(_FlattenFn):
    """[events] -> one list of TableRows (main output), ``(aggregate shard, [AggregateInput])`` per shard,
    dead letters one by one: ``_FlattenFn``'s own per-event body, its outputs regrouped."""

    def process(self, events: list):  # type: ignore[override]
        rows: list = []
        aggs: dict[int, list] = {}
        for event in events:
            for out in super().process(event):
                if isinstance(out, TableRow):
                    rows.append(out)
                elif out.tag == AGGREGATE_TAG:
                    inp = out.value.value  # TaggedOutput(TimestampedValue(AggregateInput))
                    aggs.setdefault(_shard(f"{inp.partner}\x1f{inp.aggregate}\x1f{inp.key}"), []).append(inp)
                else:
                    yield out
        if rows:
            yield rows
        for s, inputs in aggs.items():
            yield TaggedOutput(AGGREGATE_TAG, (s, inputs))


# -- ComputeAggregates ------------------------------------------------------------------------------------
_KINDS = ("close", "ttl", "probe")


class _KeyTimer:
    """One key's timer inside a shard: what ``_AggregateCore`` sets and clears (``set(ts)``, ``clear()``)."""

    __slots__ = ("shard", "key", "kind")

    def __init__(self, shard: "_AggShard", key: AggKey, kind: str):
        self.shard, self.key, self.kind = shard, key, kind

    def set(self, ts: Timestamp, *_a) -> None:
        self.shard.set_timer(self.key, self.kind, ts.micros)

    def clear(self, *_a) -> None:
        self.shard.set_timer(self.key, self.kind, None)


class _AggShard:
    """Every key of one aggregate shard: its AggState, its timers (close/ttl/probe in watermark time, emit in
    processing time) as heaps with lazy deletion, the keys changed since the log was last appended."""

    __slots__ = ("states", "timers", "wm", "rt", "dirty", "logged", "armed_wm", "armed_rt")

    def __init__(self):
        self.states: dict = {}
        self.timers: dict = {}  # key -> {kind: t_us}
        self.wm: list = []  # (t_us, kind, key)
        self.rt: list = []  # (t_us, "emit", key)
        self.dirty: set = set()
        self.logged = 0
        self.armed_wm: Optional[int] = None
        self.armed_rt: Optional[int] = None

    def set_timer(self, key: AggKey, kind: str, t_us: Optional[int]) -> None:
        mine = self.timers.get(key)
        if t_us is None:
            if mine is not None:
                mine.pop(kind, None)
                if not mine:
                    del self.timers[key]
            return
        if mine is None:
            mine = self.timers[key] = {}
        if mine.get(kind) == t_us:
            return
        mine[kind] = t_us
        heapq.heappush(self.rt if kind == "emit" else self.wm, (t_us, kind, key))

    def earliest(self, heap: list) -> Optional[int]:
        """The time of the earliest live timer in ``heap`` (entries moved or cleared since are dropped), else None."""
        while heap:
            t, kind, key = heap[0]
            if (self.timers.get(key) or {}).get(kind) == t:
                return t
            heapq.heappop(heap)
        return None

    def due(self, heap: list, upto: Optional[int]) -> Optional[tuple]:
        """Pop and return the earliest live timer (at or before ``upto``; any when None), else None."""
        t = self.earliest(heap)
        if t is None or (upto is not None and t > upto):
            return None
        _, kind, key = heapq.heappop(heap)
        self.set_timer(key, kind, None)
        return t, kind, key


def _log_entry(key: AggKey, st: Optional[A.AggState]) -> list:
    """A key's line in its shard's log: the key and its state's bytes embedded as JSON (None: no state)."""
    return [key[0], key[1], key[2], None if st is None else orjson.Fragment(st.to_bytes())]


class _AggregateShardFn(_AggregateCore):
    """(shard, [AggregateInput]) -> AggregateRows and dead letters; ``_AggregateCore`` per input and timer."""

    LOG = BagStateSpec("hw_aggs_log", BytesCoder())
    WM = TimerSpec("hw_due", TimeDomain.WATERMARK)
    RT = TimerSpec("hw_emit", TimeDomain.REAL_TIME)

    def __init__(self, specs, step: str, clock: Callable[[], float], job: str, seed=None):
        super().__init__(specs, step, clock, seed, None)
        self._job = job

    # _AggregateCore's state hooks, on the shard instead of a per-key cell
    def _load(self, key: AggKey, cell) -> Optional[A.AggState]:
        return cell.states.get(key)

    def _store(self, key: AggKey, cell, st: Optional[A.AggState]) -> None:
        if st is None:
            cell.states.pop(key, None)
        else:
            cell.states[key] = st
        cell.dirty.add(key)

    def _shard_state(self, shard: int, log) -> _AggShard:
        sh = held(self._job, self._step, f"shard{shard}")
        if sh is None:  # not in this process: replay the shard's log (the last entry of a key wins)
            sh = _AggShard()
            for blob in log.read():
                for k0, k1, k2, raw in orjson.loads(blob):
                    key = (k0, k1, k2)
                    if raw is None:
                        sh.states.pop(key, None)
                    else:
                        sh.states[key] = A.AggState.from_bytes(orjson.dumps(raw))  # logged as JSON (Fragment)
                    sh.logged += 1
            now = self._now_us()
            for key, st in sh.states.items():  # the timers the states want (an emission, if pending, now)
                for kind, t in zip(_KINDS, (st.close_at, st.ttl_at, st.probe_at)):
                    if t is not None:
                        sh.set_timer(key, kind, t)
                if st.emit_pending:
                    sh.set_timer(key, "emit", now)
            hold(self._job, self._step, f"shard{shard}", sh)
        return sh  # type: ignore[return-value]

    def _timers(self, sh: _AggShard, key: AggKey) -> tuple:
        return (_KeyTimer(sh, key, "emit"), _KeyTimer(sh, key, "close"), _KeyTimer(sh, key, "ttl"),
                _KeyTimer(sh, key, "probe"))

    def _finish(self, sh: _AggShard, log, wm, rt) -> None:
        """Append the changed keys to the shard's log (compacted when it holds twice what is live) and set the
        shard's two timers to the earliest of its keys' timers."""
        if sh.dirty:
            entries = [_log_entry(key, sh.states.get(key)) for key in sh.dirty]
            sh.dirty.clear()
            log.add(orjson.dumps(entries))
            sh.logged += len(entries)
            if sh.logged > 2 * len(sh.states) + 1024:
                log.clear()
                log.add(orjson.dumps([_log_entry(k, st) for k, st in sh.states.items()]))
                sh.logged = len(sh.states)
        for heap, timer, attr in ((sh.wm, wm, "armed_wm"), (sh.rt, rt, "armed_rt")):
            t = sh.earliest(heap)
            if t is not None and t != getattr(sh, attr):
                timer.set(Timestamp(micros=min(t, _MAX_US)))
                setattr(sh, attr, t)

    def process(self, element, log=beam.DoFn.StateParam(LOG), wm=beam.DoFn.TimerParam(WM),
                rt=beam.DoFn.TimerParam(RT)):
        shard, inputs = element
        sh = self._shard_state(shard, log)
        for inp in inputs:
            key = (inp.partner, inp.aggregate, inp.key)
            yield from self._process((key, inp), sh, self._timers(sh, key))
        self._finish(sh, log, wm, rt)

    def _fire(self, shard: int, heap_name: str, ts: Timestamp, log, wm, rt) -> Iterator:
        sh = self._shard_state(shard, log)
        setattr(sh, "armed_wm" if heap_name == "wm" else "armed_rt", None)  # this firing consumed the timer
        heap = getattr(sh, heap_name)
        while True:
            nxt = sh.due(heap, ts.micros)
            if nxt is None:
                break
            t, kind, key = nxt
            # the key's timer fires with its own time, as a per-key timer would
            yield from self._timer(kind, key, Timestamp(micros=t), sh, self._timers(sh, key))
        self._finish(sh, log, wm, rt)

    @on_timer(WM)
    def _on_due(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam, log=beam.DoFn.StateParam(LOG),
                wm=beam.DoFn.TimerParam(WM), rt=beam.DoFn.TimerParam(RT)):
        yield from self._fire(key, "wm", ts, log, wm, rt)

    @on_timer(RT)
    def _on_emit(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam, log=beam.DoFn.StateParam(LOG),
                 wm=beam.DoFn.TimerParam(WM), rt=beam.DoFn.TimerParam(RT)):
        # a processing-time timer's timestamp is the time it was set for: every emission due by then
        yield from self._fire(key, "rt", Timestamp(micros=max(ts.micros, self._now_us())), log, wm, rt)


class LiveBatches(beam.PTransform):
    """PCollection[Event] (ParseEnvelope's events) -> (rows: PCollection[list[TableRow]],
    aggregates: PCollection[AggregateRow] or None, dead_letters: list of PCollection[DeadLetter]).

    ``job``: the token of a job whose state lives in this process (``ingest.pipeline._state_in_this_process``).
    ``specs``: ``(partner, aggregate) -> AggregateSpec`` (empty: no aggregate step). Step labels follow the
    per-key job's (``DropDuplicateEvents``, ``FlattenEvents``, ``ComputeAggregates``) so dead letters and
    counters name the same steps."""

    def __init__(self, contract, specs: dict, job: str, recovery=None, clock: Callable[[], float] = time.time,
                 label: str = "LiveBatches"):
        super().__init__(label)
        self._contract, self._specs, self._job, self._rec, self._clock = contract, dict(specs), job, recovery, clock

    def expand(self, events):
        rec = self._rec
        batches = events | "BatchEvents" >> beam.ParDo(_BatchFn()).with_output_types(Tuple[int, Any])
        kept = batches | "DropDuplicateEvents" >> beam.ParDo(_DedupShardFn(
            self._contract.dedup.window_s(), self._job, "DropDuplicateEvents", rec.seen if rec else None,
            self._clock)).with_output_types(Any)
        flat = kept | "FlattenEvents" >> beam.ParDo(_FlattenBatchFn(self._contract, "FlattenEvents")).with_output_types(
            Any, **{AGGREGATE_TAG: Tuple[int, Any], DEAD_LETTER_TAG: DeadLetter}).with_outputs(
            AGGREGATE_TAG, DEAD_LETTER_TAG, main="rows")
        dead = [flat[DEAD_LETTER_TAG]]
        aggregates = None
        if self._specs:
            step = "ComputeAggregates/AggregatePerKey"
            outs = flat[AGGREGATE_TAG] | "ComputeAggregates" >> beam.ParDo(_AggregateShardFn(
                self._specs, step, self._clock, self._job, rec.states if rec else None)).with_output_types(
                AggregateRow, **{"dead_letter": DeadLetter}).with_outputs("dead_letter", main="aggregates")
            aggregates = outs["aggregates"]
            dead.append(outs["dead_letter"])
        return flat["rows"], aggregates, dead

