"""``ComputeAggregates``: per-key aggregates inside the stream, on Beam state and timers.

Input: ``PCollection[AggregateInput]`` in the global window, element timestamps
= event time (the DoFn reads ``AggregateInput.event_time_us``; the timestamp
only matters to the runner's watermark). Output: :class:`AggregateOutputs`
with ``aggregates`` (``PCollection[AggregateRow]``, global window) and
``dead_letter`` (``PCollection[DeadLetter]``: reason ``late`` for data later
than the allowed lateness, ``type_conflict`` for a value a metric cannot use,
``malformed_json`` / ``unknown_partner`` for inputs the lead's extraction got
wrong). The arithmetic lives in :mod:`state.aggregate`; this module only moves
state bytes and timers. Design and trade-offs: docs/state.md.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
import orjson
from apache_beam.coders import BytesCoder
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from flatten import live
from flatten.records import AggregateInput, AggregateRow, DeadLetter, Reason
from state import aggregate as A
from state import combine as C
from state.bounded import FinalAggregates
from state.mirror import MISSING, mirror_for, sketch_for, write_new
from state.spec import AggregateSpec

__all__ = ["ComputeAggregates", "AggregateOutputs", "MANIFEST"]

AggKey = Tuple[str, str, str]  # (partner, aggregate, key): str tuple -> deterministic coder

#: Step labels inside ComputeAggregates. Renaming one breaks Dataflow --update: add a mapping entry.
KEY_LABEL = "KeyByAggregateKey"
AGG_LABEL = "AggregatePerKey"
#: The ParDo inside AGG_LABEL (a multi-output ParDo is a composite around it): the stateful step that
#: Dataflow matches state by. Named for its role, never after the DoFn class (was ``ParDo(_StreamingAggregateFn)``;
#: deploy/manifest/name_mapping.json maps the old name).
STATE_LABEL = "PerKeyState"
CHECK_LABEL = "CheckAggregateInputs"  # bounded input only (batch jobs are never updated in place)
AGGREGATES_TAG = "aggregates"
DEAD_LETTER_TAG = "dead_letter"

#: Manifest of the stateful step: state cell and timer names with their coder/domain.
#: tests/state/test_manifest.py compares it with state/manifest.json (the checked-in copy).
MANIFEST = {
    "steps": [KEY_LABEL, AGG_LABEL],
    "stateful_step": f"{AGG_LABEL}/{STATE_LABEL}",
    "state_layout_version": A.LAYOUT_VERSION,
    "key_coder": "TupleCoder[StrUtf8Coder, StrUtf8Coder, StrUtf8Coder]",
    "state": {"hw_agg_v1": "BytesCoder (orjson AggState)"},
    "timers": {
        "hw_emit": "REAL_TIME",
        "hw_close": "WATERMARK",
        "hw_ttl": "WATERMARK",
        "hw_probe": "WATERMARK",
    },
}

_MAX_US = int(GlobalWindow().max_timestamp().micros)


class AggregateOutputs(NamedTuple):
    aggregates: beam.PCollection
    dead_letter: beam.PCollection


def _ts(us: int) -> Timestamp:
    return Timestamp(micros=min(us, _MAX_US))


class _NoTimer:
    """Stand-in for the processing-time timer in the bounded variant (no cadence in a backfill)."""

    def set(self, *_a) -> None:
        pass

    def clear(self, *_a) -> None:
        pass


_NO_TIMER = _NoTimer()


class _AggregateCore(beam.DoFn):
    """Shared body of both variants: decode state, call the pure function, set timers, encode state."""

    # State and timer names: a contract (Dataflow --update matches on them); see MANIFEST.
    STATE_NAME = "hw_agg_v1"
    EMIT_TIMER_NAME = "hw_emit"
    CLOSE_TIMER_NAME = "hw_close"
    TTL_TIMER_NAME = "hw_ttl"
    PROBE_TIMER_NAME = "hw_probe"

    def __init__(self, specs: Mapping[tuple[str, str], AggregateSpec], step: str,
                 clock: Callable[[], float], seed=None, local_state: Optional[str] = None):
        self._specs = dict(specs)
        self._step = step
        self._clock = clock
        self._seed = seed  # ingest.recovery.AggregateSeed: a key's state rebuilt from the warehouse (restart)
        self._plans: dict[tuple[str, str], A.Plan] = {}
        # A job token when the runner's state lives in this process (Prism, LOOPBACK): the cells' bytes are
        # mirrored here (state.mirror.ValueMirror) and read from the runner only on a miss. None: always read.
        self._local_state = local_state

    def setup(self) -> None:
        if self._seed is not None:
            self._seed.load()
        self._mirror = mirror_for(self._local_state, self._step) if self._local_state else None
        self._written = sketch_for(self._local_state, self._step) if self._local_state else None  # keys ever written
        self._plans = {k: A.plan_for(s) for k, s in self._specs.items()}
        self._late = Metrics.counter("headwater.state", "dead_letter_late")
        self._bad = Metrics.counter("headwater.state", "dead_letter_other")
        self._rows = Metrics.counter("headwater.state", "rows_emitted")
        self._dropped = Metrics.counter("headwater.state", "removed_aggregate_keys_dropped")
        # keys holding state = created - expired (per worker; the status line of `headwater run`)
        self._keys_created = live.mirror(Metrics.counter("headwater", "state_keys_created"), "state_keys_created")
        self._keys_expired = live.mirror(Metrics.counter("headwater", "state_keys_expired"), "state_keys_expired")

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def _dead(self, inp: AggregateInput, reason: str, error_class: str, message: str) -> TaggedOutput:
        (self._late if reason == Reason.LATE else self._bad).inc()
        return TaggedOutput(DEAD_LETTER_TAG, DeadLetter(
            partner=inp.partner, source="aggregate", coords=f"{inp.aggregate}:{inp.key}#{inp.event_id}",
            payload=inp.values, payload_ref="sha256:" + hashlib.sha256(inp.values).hexdigest(),
            error_class=error_class, reason=reason, message=message, step=self._step,
            event_time_us=inp.event_time_us, processing_time_us=self._now_us()))

    def _sync(self, st: Optional[A.AggState], before: tuple, plan: A.Plan, timers: tuple) -> None:
        emit_t, close_t, ttl_t, probe_t = timers
        after = (None, None, None) if st is None else (st.close_at, st.ttl_at, st.probe_at)
        for timer, old, new in zip((close_t, ttl_t, probe_t), before, after):
            if new != old:
                if new is None:
                    timer.clear()
                else:
                    timer.set(_ts(new))
        if st is not None and st.dirty and emit_t is not _NO_TIMER:
            # The next cadence boundary (processing time, aligned to emit_every). Set on every change,
            # not only when none is pending: re-setting the same boundary is idempotent (no starvation
            # of busy keys), and a firing the runner lost (seen on Prism when it splits a bundle that
            # holds timers, apache/beam#35771) cannot silence the key for good.
            every = plan.emit_every_us
            emit_t.set(_ts((self._now_us() // every + 1) * every))
            st.emit_pending = True

    def _out(self, key: AggKey, rows: list[A.EmitRow]) -> Iterator[AggregateRow]:
        now = self._now_us()
        for r in rows:
            self._rows.inc()
            yield AggregateRow(partner=key[0], aggregate=key[1], key=key[2], window=r.window,
                               metrics=orjson.dumps(r.metrics), watermark_us=r.watermark_us,
                               version=r.version, emitted_us=now, final=r.final)

    def _load(self, key: AggKey, cell) -> Optional[A.AggState]:
        mirror = getattr(self, "_mirror", None)
        if mirror is None:
            raw = cell.read()
        else:
            raw = mirror.get(key, MISSING)
            if raw is MISSING:
                # a key this job never wrote has no state (a new user): no read
                raw = (cell.read() or None) if self._written.may_contain("\x1f".join(key)) else None
                mirror.put(key, raw)
        return A.AggState.from_bytes(raw) if raw else None

    def _store(self, key: AggKey, cell, st: Optional[A.AggState]) -> None:
        """Write (or clear, for None) the key's cell, and its mirror."""
        raw = None if st is None else st.to_bytes()
        mirror = getattr(self, "_mirror", None)
        if raw is None:
            cell.clear()
        elif mirror is not None and not self._written.may_contain("\x1f".join(key)):
            write_new(cell, raw)  # a key this job never wrote: its cell is empty, no clear to send
        else:
            cell.write(raw)
        if mirror is not None:
            mirror.put(key, raw)
            if raw is not None:
                self._written.add("\x1f".join(key))

    def _decode(self, inp: AggregateInput) -> "tuple[Optional[A.Plan], Optional[dict], Optional[TaggedOutput]]":
        """(plan, values, None) for a usable input, else (None, None, dead letter)."""
        plan = self._plans.get((inp.partner, inp.aggregate))
        if plan is None:
            return None, None, self._dead(inp, Reason.UNKNOWN_PARTNER, "UnknownAggregate",
                                          f"no aggregate {inp.aggregate!r} declared for partner {inp.partner!r}")
        try:
            values = orjson.loads(inp.values)
        except orjson.JSONDecodeError as e:
            return None, None, self._dead(inp, Reason.MALFORMED_JSON, "JSONDecodeError", str(e))
        if not isinstance(values, dict):
            return None, None, self._dead(inp, Reason.NOT_AN_OBJECT, "TypeError",
                                          "AggregateInput.values is not an object")
        return plan, values, None

    def _process(self, element: tuple[AggKey, AggregateInput], cell, timers: tuple) -> Iterator:
        _, inp = element
        plan, values, dead = self._decode(inp)
        if dead is not None:
            yield dead
            return
        st = self._load(element[0], cell)
        new_key = st is None
        before = (None, None, None) if st is None else (st.close_at, st.ttl_at, st.probe_at)
        if st is None and self._seed is not None:  # first touch after a restart: resume from the warehouse
            seeded = self._seed.take(element[0])
            st = A.AggState.from_bytes(seeded) if seeded else None
        st, rejections = A.step(st, A.Event(inp.event_time_us, inp.event_id, values), plan)
        for r in rejections:
            yield self._dead(inp, r.reason, "LateEvent" if r.reason == Reason.LATE else "TypeConflict", r.message)
        if rejections and rejections[0].reason == Reason.LATE:
            return  # state untouched
        self._sync(st, before, plan, timers)
        self._store(element[0], cell, st)
        if new_key:
            self._keys_created.inc()

    def _timer(self, which: str, key: AggKey, ts: Timestamp, cell, timers: tuple) -> Iterator[AggregateRow]:
        st = self._load(key, cell)
        if st is None:
            return
        plan = self._plans.get((key[0], key[1]))
        if plan is None:
            # The aggregate was removed from the contract (an update kept its state and timers):
            # drop the key's state and every pending timer instead of failing the bundle forever.
            self._dropped.inc()
            self._store(key, cell, None)
            for t in timers:
                t.clear()
            return
        # The timers the runner holds are those of the state as stored (before any layout migration,
        # which happens inside the pure functions and may move the close and TTL deadlines).
        before = [st.close_at, st.ttl_at, st.probe_at]
        rows: list[A.EmitRow] = []
        if which == "emit":
            st, rows = A.emit(st, plan)
        elif which == "close":
            before[0] = None  # the fired timer is no longer set
            st, rows = A.on_close(st, plan, ts.micros)
        elif which == "probe":
            before[2] = None
            st = A.on_probe(st, plan, ts.micros)
        else:
            # A stale firing (the deadline moved since; the FnApiRunner can deliver an overwritten
            # timer) leaves the newer TTL timer (the stored ttl_at) in place: ``before`` says so, and
            # only a deadline moved by a layout migration (new ttl) is set again.
            st, rows = A.expire(st, plan, ts.micros)
        if st is None:
            # TTL: every cell and timer of the key is cleared (the state-hygiene path).
            self._store(key, cell, None)
            for t in timers:
                t.clear()
            self._keys_expired.inc()
        else:
            self._sync(st, tuple(before), plan, timers)
            self._store(key, cell, st)
        yield from self._out(key, rows)


class _StreamingAggregateFn(_AggregateCore):
    """Unbounded input: adds the processing-time emission cadence (``emit_every``)."""

    # A TimerSpec takes one callback, so each variant declares its own specs (same names).
    S = ReadModifyWriteStateSpec(_AggregateCore.STATE_NAME, BytesCoder())
    E = TimerSpec(_AggregateCore.EMIT_TIMER_NAME, TimeDomain.REAL_TIME)
    C = TimerSpec(_AggregateCore.CLOSE_TIMER_NAME, TimeDomain.WATERMARK)
    T = TimerSpec(_AggregateCore.TTL_TIMER_NAME, TimeDomain.WATERMARK)
    P = TimerSpec(_AggregateCore.PROBE_TIMER_NAME, TimeDomain.WATERMARK)

    def process(self, element: tuple[AggKey, AggregateInput], cell=beam.DoFn.StateParam(S),
                e=beam.DoFn.TimerParam(E), c=beam.DoFn.TimerParam(C), t=beam.DoFn.TimerParam(T),
                p=beam.DoFn.TimerParam(P)):
        yield from self._process(element, cell, (e, c, t, p))

    @on_timer(E)
    def _on_emit(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(S),
                 e=beam.DoFn.TimerParam(E), c=beam.DoFn.TimerParam(C), t=beam.DoFn.TimerParam(T),
                 p=beam.DoFn.TimerParam(P)):
        yield from self._timer("emit", key, ts, cell, (e, c, t, p))

    @on_timer(C)
    def _on_close(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(S),
                  e=beam.DoFn.TimerParam(E), c=beam.DoFn.TimerParam(C), t=beam.DoFn.TimerParam(T),
                  p=beam.DoFn.TimerParam(P)):
        yield from self._timer("close", key, ts, cell, (e, c, t, p))

    @on_timer(T)
    def _on_ttl(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(S),
                e=beam.DoFn.TimerParam(E), c=beam.DoFn.TimerParam(C), t=beam.DoFn.TimerParam(T),
                p=beam.DoFn.TimerParam(P)):
        yield from self._timer("ttl", key, ts, cell, (e, c, t, p))

    @on_timer(P)
    def _on_probe(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(S),
                  e=beam.DoFn.TimerParam(E), c=beam.DoFn.TimerParam(C), t=beam.DoFn.TimerParam(T),
                  p=beam.DoFn.TimerParam(P)):
        yield from self._timer("probe", key, ts, cell, (e, c, t, p))


class _BoundedAggregateFn(_AggregateCore):
    """Bounded input (backfill): no processing-time timer and no watermark probe.

    The watermark stays at -inf until all input is read, so nothing is late and
    the probe could learn nothing; without a REAL_TIME timer the DirectRunner
    can use its fast batch runner. Rows come from the close and TTL timers,
    which are the same rows (same values) the stream emits.
    """

    S = ReadModifyWriteStateSpec(_AggregateCore.STATE_NAME, BytesCoder())
    C = TimerSpec(_AggregateCore.CLOSE_TIMER_NAME, TimeDomain.WATERMARK)
    T = TimerSpec(_AggregateCore.TTL_TIMER_NAME, TimeDomain.WATERMARK)

    def process(self, element: tuple[AggKey, AggregateInput], cell=beam.DoFn.StateParam(S),
                c=beam.DoFn.TimerParam(C), t=beam.DoFn.TimerParam(T)):
        # No close timer either: every event is in before any timer fires, so the TTL firing's
        # catch-up (aggregate.expire) emits exactly the close rows the timers would have, in order,
        # with one timer per key instead of one per bucket boundary (the runner's per-timer cost
        # dominates a backfill: docs/state.md, figures).
        yield from self._process(element, cell, (_NO_TIMER, _NO_TIMER, t, _NO_TIMER))

    @on_timer(C)
    def _on_close(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(S),
                  c=beam.DoFn.TimerParam(C), t=beam.DoFn.TimerParam(T)):
        yield from self._timer("close", key, ts, cell, (_NO_TIMER, c, t, _NO_TIMER))

    @on_timer(T)
    def _on_ttl(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(S),
                c=beam.DoFn.TimerParam(C), t=beam.DoFn.TimerParam(T)):
        yield from self._timer("ttl", key, ts, cell, (_NO_TIMER, c, t, _NO_TIMER))


class _CheckInputsFn(_AggregateCore):
    """Bounded input, before the combine: every input is checked once (unknown aggregate, malformed
    values, type conflicts -> dead letters, as the stateful variants report them) and passed on as
    ``(key, (event_time_us, event_id, values))`` for ``state.bounded.FinalAggregates``. Nothing is
    late in a bounded input (the watermark stays at -inf until all input is read)."""

    def process(self, element: tuple[AggKey, AggregateInput]) -> Iterator:
        key, inp = element
        plan, values, dead = self._decode(inp)
        if dead is not None:
            yield dead
            return
        for r in C.conflicts(values, plan):
            yield self._dead(inp, r.reason, "TypeConflict", r.message)
        yield key, (inp.event_time_us, inp.event_id, values)


def _typed(fn: beam.DoFn, label: str) -> beam.PTransform:
    """The aggregate ParDo: typed outputs (Row coders, never pickle) and an explicit inner label."""
    pardo = beam.ParDo(fn).with_output_types(AggregateRow, **{DEAD_LETTER_TAG: DeadLetter})
    pardo.label = label
    return pardo.with_outputs(DEAD_LETTER_TAG, main=AGGREGATES_TAG)


def _key_of(inp: AggregateInput) -> tuple[AggKey, AggregateInput]:
    return (inp.partner, inp.aggregate, inp.key), inp


class ComputeAggregates(beam.PTransform):
    """PCollection[AggregateInput] -> AggregateOutputs(aggregates=PCollection[AggregateRow],
    dead_letter=PCollection[DeadLetter]).

    ``specs`` maps ``(partner, aggregate name)`` to its :class:`AggregateSpec`.
    ``clock`` (seconds since the epoch) only sets processing-time timers and
    ``emitted_us``/``processing_time_us``; it never influences values or versions.
    ``fold_bounded`` (default): bounded input is checked once per input (dead letters) and combined
    per key with lifted partial merges (``state.bounded.FinalAggregates``), emitting one final row per
    (key, window); False keeps the stateful variant for bounded input too, with its close panes
    (tests compare the final rows of the two).
    ``streaming``: None picks the variant from the input (unbounded: processing-time
    cadence + watermark probe; bounded: neither); True/False forces it.
    """

    def __init__(self, specs: Mapping[tuple[str, str], AggregateSpec],
                 clock: Callable[[], float] = time.time, label: Optional[str] = None,
                 streaming: Optional[bool] = None, fold_bounded: bool = True, seed=None,
                 local_state: Optional[str] = None):
        super().__init__(label)
        self._seed = seed  # ingest.recovery.AggregateSeed (a restarted local stream), stateful variants only
        self._local_state = local_state  # a job token: state mirrored in-process (state.mirror), streaming only
        self._streaming = streaming
        self._fold_bounded = fold_bounded
        if not specs:
            raise ValueError("ComputeAggregates needs at least one (partner, aggregate) spec")
        for (partner, name), spec in specs.items():
            if not isinstance(spec, AggregateSpec):
                raise TypeError(f"partner {partner!r} aggregate {name!r}: expected AggregateSpec, got {type(spec).__name__}")
            if spec.name != name:
                raise ValueError(f"partner {partner!r}: aggregate key {name!r} != spec.name {spec.name!r}")
        self._specs = dict(specs)
        self._clock = clock

    def expand(self, pcoll: beam.PCollection) -> AggregateOutputs:
        keyed = pcoll | KEY_LABEL >> beam.Map(_key_of).with_input_types(AggregateInput).with_output_types(
            Tuple[AggKey, AggregateInput])
        streaming = (not pcoll.is_bounded) if self._streaming is None else self._streaming
        if streaming or not self._fold_bounded:
            fn_cls = _StreamingAggregateFn if streaming else _BoundedAggregateFn
            outs = keyed | AGG_LABEL >> _typed(
                fn_cls(self._specs, f"{self.label}/{AGG_LABEL}", self._clock, self._seed,
                       self._local_state if streaming else None), STATE_LABEL)
        else:
            checked = keyed | CHECK_LABEL >> beam.ParDo(
                _CheckInputsFn(self._specs, f"{self.label}/{AGG_LABEL}", self._clock)
            ).with_output_types(Tuple[AggKey, Tuple[int, str, Any]], **{DEAD_LETTER_TAG: DeadLetter}).with_outputs(DEAD_LETTER_TAG, main=AGGREGATES_TAG)
            rows = checked[AGGREGATES_TAG] | AGG_LABEL >> FinalAggregates(self._specs, clock=self._clock)
            return AggregateOutputs(aggregates=rows, dead_letter=checked[DEAD_LETTER_TAG])
        return AggregateOutputs(
            aggregates=outs[AGGREGATES_TAG],
            dead_letter=outs[DEAD_LETTER_TAG])
