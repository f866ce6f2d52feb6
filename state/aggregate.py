"""Per-key aggregate arithmetic: a pure function of ``(state, event) -> (state, outputs)``.

No Beam import: ``state/transform.py`` is a thin stateful DoFn around these
functions, and the tests drive them directly.

Model (see docs/state.md for the full design):

* One :class:`AggState` per ``(partner, aggregate, key)``. It keeps a
  ``lifetime`` accumulator per metric and, when the spec has sliding windows,
  per-bucket accumulators (bucket size ``Plan.bucket_us``) for the last
  ``max window`` of event time.
* The key's event-time clock ``clock_us`` is an exclusive bound: rows emitted
  "as of W" reflect events with ``event_time < W``. ``clock_us`` is the
  maximum of (latest accepted event time + 1 us) and the latest event-time
  timer that fired for the key. It only moves forward.
* A sliding window ``N`` as of ``W`` covers the buckets that start in
  ``[ceil_b(W) - N, ceil_b(W))``: the ``N / bucket`` buckets ending with the
  one that holds ``W - 1``. At a bucket boundary ``E`` this is exactly
  ``[E - N, E)``.
* ``known_wm_us`` is a lower bound of the input watermark learnt from the
  key's fired event-time timers (the DoFn cannot read the watermark). An event
  with ``event_time < known_wm - allowed_lateness`` is late.
* ``version = max(previous + 1, W)``: strictly increasing per key (and so per
  window), roughly the as-of time in microseconds, and still increasing after
  a TTL expiry cleared the state, because a new generation's clock is past
  the expired one's.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, NamedTuple, Optional

import orjson

from state import metrics as M
from state.spec import AggregateSpec, parse_duration_s

__all__ = [
    "Plan", "plan_for", "AggState", "Event", "Rejection", "EmitRow",
    "step", "emit", "on_close", "on_probe", "expire", "window_value", "migrate", "layout_of",
    "LIFETIME", "MIN_US", "LAYOUT_VERSION",
]

LIFETIME = "lifetime"
MIN_US = -(2**62)
_US = 1_000_000
#: Version of the state layout record (``AggState.layout``). 1: positional lists without a layout (before
#: versioned state); 2: ``[2, key, [[name, fn, column], ...], hll p, bucket_us, [window names], ttl_us]``.
LAYOUT_VERSION = 2


class Plan(NamedTuple):
    """An :class:`AggregateSpec` compiled to integers (microseconds)."""

    names: tuple[str, ...]
    fns: tuple[str, ...]
    columns: tuple[Optional[str], ...]
    windows: tuple[tuple[str, Optional[int]], ...]  # (name, length_us or None for lifetime)
    bucket_us: Optional[int]
    max_window_us: int
    lateness_us: int
    ttl_us: int
    emit_every_us: int
    probe_us: int
    threshold: int
    p: int
    #: What the state's accumulators mean (see :func:`layout_of`); stored in every AggState so a changed
    #: spec (metrics, windows, key, HLL precision) migrates old state instead of misreading it.
    layout: list


def layout_of(spec: AggregateSpec) -> list:
    """The layout record of a spec, JSON-shaped (lists) so it compares equal to a decoded one."""
    bucket = spec.bucket_s()
    return [LAYOUT_VERSION, spec.key, [[m.name, m.fn, m.column] for m in spec.metrics], spec.hll_precision,
            None if bucket is None else bucket * _US, list(spec.windows), int(parse_duration_s(spec.ttl) * _US)]


@lru_cache(maxsize=None)
def plan_for(spec: AggregateSpec) -> Plan:
    sliding = spec.sliding_windows_s()
    windows = tuple((w, None if w == LIFETIME else int(sliding[w]) * _US) for w in spec.windows)
    bucket = spec.bucket_s()
    lateness = int(parse_duration_s(spec.allowed_lateness) * _US)
    return Plan(
        names=tuple(m.name for m in spec.metrics),
        fns=tuple(m.fn for m in spec.metrics),
        columns=tuple(m.column for m in spec.metrics),
        windows=windows,
        bucket_us=None if bucket is None else bucket * _US,
        max_window_us=max((n for _, n in windows if n), default=0),
        lateness_us=lateness,
        ttl_us=int(parse_duration_s(spec.ttl) * _US),
        emit_every_us=max(1, int(parse_duration_s(spec.emit_every) * _US)),
        # Watermark probe period: a quarter of the allowed lateness (>= 1 s).
        probe_us=max(_US, lateness // 4),
        threshold=spec.distinct_exact_threshold,
        p=spec.hll_precision,
        layout=layout_of(spec),
    )


class Event(NamedTuple):
    event_time_us: int
    event_id: str
    values: Mapping[str, Any]


class Rejection(NamedTuple):
    """Something in an event that was not (fully) applied; becomes a DeadLetter."""

    reason: str  # flatten.records.Reason.LATE | Reason.TYPE_CONFLICT
    message: str


class EmitRow(NamedTuple):
    window: str
    metrics: dict[str, Any]
    watermark_us: int
    version: int
    final: bool


@dataclass(slots=True)
class AggState:
    """Serialisable per-key state. ``to_bytes``/``from_bytes`` use orjson.

    ``lifetime`` and each bucket hold one accumulator per metric, in the order of ``layout``'s metric list.
    ``layout`` (None: written before layouts existed, positional) is checked on every touch against the
    plan's; a difference migrates the state first (:func:`migrate`).
    """

    version: int = 0
    max_event_us: int = MIN_US  # latest accepted event time
    clock_us: int = MIN_US  # as-of time (exclusive) of emissions
    known_wm_us: int = MIN_US  # watermark lower bound from fired timers
    closed_us: int = MIN_US  # last close boundary that fired
    dirty: bool = False  # changed since the last processing-time emission
    probe_k: int = 0  # watermark-probe backoff exponent (idle key)
    lifetime: list = field(default_factory=list)
    buckets: dict = field(default_factory=dict)  # bucket start us -> [acc per metric]
    sigs: dict = field(default_factory=dict)  # window -> crc32 of last emitted metrics
    # Desired event-time timers (None: not set). The DoFn diffs against these.
    close_at: Optional[int] = None
    ttl_at: Optional[int] = None
    probe_at: Optional[int] = None
    emit_pending: bool = False  # a processing-time emission timer is set
    layout: Optional[list] = None  # layout_of(spec) of the spec this state was written under

    def to_bytes(self) -> bytes:
        d = {f: getattr(self, f) for f in _FIELDS}  # shallow: dataclasses.asdict deep-copies (slow)
        d["buckets"] = [[b, accs] for b, accs in self.buckets.items()]
        try:
            return orjson.dumps(d)
        except TypeError:  # a sum's exact int total past 64 bits (state.metrics): written as its digits
            d["lifetime"] = _wide_accs(self.lifetime, str)
            d["buckets"] = [[b, _wide_accs(accs, str)] for b, accs in self.buckets.items()]
            d["wide"] = True
            return orjson.dumps(d)

    @classmethod
    def from_bytes(cls, data: bytes) -> "AggState":
        d = orjson.loads(data)
        if d.pop("wide", False):
            d["lifetime"] = _wide_accs(d["lifetime"], int)
            d["buckets"] = [[b, _wide_accs(accs, int)] for b, accs in d["buckets"]]
        d["buckets"] = {b: accs for b, accs in d["buckets"]}
        return cls(**d)


def _wide_accs(accs: list, conv) -> list:
    """``accs`` with every sum accumulator's int total (``[total, partials, n]``) passed through ``conv``: ``str``
    to write a total past 64 bits (only states holding one take this path; others are written as before),
    ``int`` to read it back. No other accumulator has a list as its second item and an int or digits first."""
    return [[conv(a[0]), a[1], a[2]] if isinstance(a, list) and len(a) == 3 and isinstance(a[1], list)
            and isinstance(a[0], (int, str)) and not isinstance(a[0], bool) else a for a in accs]


_FIELDS = tuple(f.name for f in dataclasses.fields(AggState))


def _new(plan: Plan) -> AggState:
    return AggState(lifetime=[M.new_acc(f) for f in plan.fns], layout=plan.layout)


def _fit(st: Optional[AggState], plan: Plan) -> AggState:
    """The state to work on: new, or migrated to ``plan``'s layout on first touch."""
    if st is None:
        return _new(plan)
    if st.layout is plan.layout:
        return st
    if st.layout == plan.layout:
        st.layout = plan.layout
        return st
    return migrate(st, plan)


def _floor(t: int, g: int) -> int:
    return t - t % g


def _ceil(t: int, g: int) -> int:
    return -((-t) // g) * g


# ---------------------------------------------------------------- events


def step(state: Optional[AggState], ev: Event, plan: Plan) -> tuple[AggState, list[Rejection]]:
    """Apply one event. Late events (before ``known_wm - allowed_lateness``) leave the state unchanged."""
    st = _fit(state, plan)
    t = ev.event_time_us
    if t < st.known_wm_us - plan.lateness_us:
        return st, [Rejection("late", f"event time {t} us is before the key's watermark {st.known_wm_us} us "
                                       f"minus allowed lateness {plan.lateness_us} us")]
    rejections: list[Rejection] = []
    bucket = None
    st.clock_us = max(st.clock_us, t + 1)
    if plan.bucket_us is not None:
        b = _floor(t, plan.bucket_us)
        # A bucket that has left every window for good (as of the key's clock) only feeds the lifetime.
        if b >= _ceil(st.clock_us, plan.bucket_us) - plan.max_window_us:
            bucket = st.buckets.get(b)
            if bucket is None:
                bucket = st.buckets[b] = [M.new_acc(f) for f in plan.fns]
                _prune(st, plan)
    for i, (fn, col) in enumerate(zip(plan.fns, plan.columns)):
        value = ev.values.get(col) if col else None
        try:
            st.lifetime[i] = M.add(fn, st.lifetime[i], value, t, ev.event_id, plan.threshold, plan.p)
            if bucket is not None:
                bucket[i] = M.add(fn, bucket[i], value, t, ev.event_id, plan.threshold, plan.p)
        except M.TypeConflict as e:
            rejections.append(Rejection("type_conflict", f"metric {plan.names[i]!r} column {col!r}: {e}"))
    st.max_event_us = max(st.max_event_us, t)
    st.dirty = True
    # Timers have millisecond precision on portable runners: keep every timer time on a whole ms.
    st.ttl_at = _ceil(st.max_event_us + plan.ttl_us, 1000)
    st.probe_k = 0
    nxt = (max(t, st.known_wm_us) // plan.probe_us + 1) * plan.probe_us
    st.probe_at = nxt if st.probe_at is None else min(st.probe_at, nxt)
    st.close_at = _next_close(st, plan)
    return st, rejections


# ---------------------------------------------------------------- reading windows


def window_value(st: AggState, plan: Plan, length_us: Optional[int], as_of_us: int) -> dict[str, Any]:
    """Metric values of one window as of ``as_of_us`` (exclusive)."""
    if length_us is None:
        accs = st.lifetime
    else:
        g = plan.bucket_us
        assert g is not None
        end = _ceil(as_of_us, g)
        start = end - length_us
        accs = [M.new_acc(f) for f in plan.fns]
        for b in sorted(st.buckets):
            if start <= b < end:
                accs = [M.merge(f, a, x, plan.threshold, plan.p) for f, a, x in zip(plan.fns, accs, st.buckets[b])]
    return {n: M.result(f, a, plan.p) for n, f, a in zip(plan.names, plan.fns, accs)}


def _rows(st: AggState, plan: Plan, which: tuple[tuple[str, Optional[int]], ...], *,
          only_changed: bool, final: bool) -> list[EmitRow]:
    w = st.clock_us
    rows = []
    for name, length in which:
        vals = window_value(st, plan, length, w)
        # A row is news when its value or the watermark it reflects moved.
        sig = zlib.crc32(orjson.dumps([vals, w], option=orjson.OPT_SORT_KEYS))
        if only_changed and st.sigs.get(name) == sig:
            continue
        st.sigs[name] = sig
        st.version = max(st.version + 1, w)
        rows.append(EmitRow(name, vals, w, st.version, final))
    return rows


# ---------------------------------------------------------------- timers


def emit(st: AggState, plan: Plan) -> tuple[AggState, list[EmitRow]]:
    """Processing-time cadence: one row per window whose value changed since its last row."""
    st = _fit(st, plan)
    st.emit_pending = False
    if not st.dirty:
        return st, []
    st.dirty = False
    return st, _rows(st, plan, plan.windows, only_changed=True, final=False)


def _advance(st: AggState, plan: Plan, t_us: int) -> None:
    st.known_wm_us = max(st.known_wm_us, t_us)
    st.clock_us = max(st.clock_us, t_us)
    _prune(st, plan)


def _prune(st: AggState, plan: Plan) -> None:
    if plan.bucket_us is not None:
        keep_from = _ceil(st.clock_us, plan.bucket_us) - plan.max_window_us
        for b in [b for b in st.buckets if b < keep_from]:
            del st.buckets[b]


def _next_close(st: AggState, plan: Plan) -> Optional[int]:
    """Next bucket boundary after the last fired close where a sliding window changes:
    a bucket completes (b + bucket) or leaves a window (b + N + bucket)."""
    g = plan.bucket_us
    if g is None or not st.buckets:
        return None
    best = None
    floor = st.closed_us
    for b in st.buckets:
        for c in (b + g, *(b + n + g for _, n in plan.windows if n)):
            if c > floor and (best is None or c < best):
                best = c
    return best


def on_close(st: AggState, plan: Plan, t_us: int) -> tuple[AggState, list[EmitRow]]:
    """Event-time timer at a window boundary: the watermark passed ``t_us``; emit the sliding windows
    whose value or as-of time moved (the on-time pane of the window ending at ``t_us``)."""
    st = _fit(st, plan)
    st.closed_us = max(st.closed_us, t_us)
    _advance(st, plan, t_us)
    rows = _rows(st, plan, tuple(w for w in plan.windows if w[1] is not None), only_changed=True, final=False)
    st.close_at = _next_close(st, plan)
    return st, rows


def on_probe(st: AggState, plan: Plan, t_us: int) -> AggState:
    """Watermark probe fired: learn ``known_wm >= t_us``; back off exponentially while the key is idle."""
    st = _fit(st, plan)
    _advance(st, plan, t_us)
    st.probe_k = min(st.probe_k + 1, 40)
    nxt = t_us + plan.probe_us * (2 ** st.probe_k)
    st.probe_at = nxt if st.ttl_at is None or nxt < st.ttl_at else None
    return st


def expire(st: AggState, plan: Plan, t_us: int) -> tuple[Optional[AggState], list[EmitRow]]:
    """TTL timer: the key has been silent for ``ttl``; emit final rows and clear the state.

    Returns ``(None, rows)`` when the state must be cleared; ``(state, [])`` when the
    deadline moved (a newer event arrived, or a longer ``ttl`` moved it on migration) and the timer is stale.
    """
    st = _fit(st, plan)
    if st.ttl_at is not None and t_us < st.ttl_at:
        return st, []
    # Runners may hand several due timers over in one batch (the DirectRunner does), so a
    # close timer set by an earlier callback may not have fired yet: emit those closes first,
    # in order, so the row sequence does not depend on how a runner batches timers.
    rows: list[EmitRow] = []
    while st.close_at is not None and st.close_at <= t_us:
        st, more = on_close(st, plan, st.close_at)
        rows += more
    _advance(st, plan, t_us)
    return None, rows + _rows(st, plan, plan.windows, only_changed=False, final=True)


# ---------------------------------------------------------------- layout migration


def _legacy_index(st: AggState, plan: Plan) -> dict[int, int]:
    """Layout 1 (positional, no names): metric i keeps old accumulator i when its shape fits the metric's fn.
    Right when metrics were only appended or removed from the end; an edit that reorders metrics of the
    same kind cannot be detected from the bytes (docs/deploy.md: state layouts)."""
    return {i: i for i, fn in enumerate(plan.fns)
            if i < len(st.lifetime) and M.fits(fn, st.lifetime[i])
            and all(i < len(accs) and M.fits(fn, accs[i]) for accs in st.buckets.values())}


def migrate(st: AggState, plan: Plan) -> AggState:
    """Bring state written under another layout to ``plan``'s (pure; called on first touch).

    * metrics are matched by ``(name, fn, column)``: kept metrics keep their accumulators, new ones start
      empty, removed ones are dropped; a distinct metric's HyperLogLog registers are reset when
      ``hll_precision`` changed (exact sets are kept);
    * a changed aggregate ``key`` resets every accumulator (the key space changed), keeping the version
      so emitted versions still increase;
    * windows: rows of removed windows stop, added ones are computed from the buckets still held
      (a longer window covers its full length only after that much event time); when the bucket size
      changes, old buckets are merged into the new ones containing their start (exact when the new size
      is a multiple of the old, else an old bucket counts in the new bucket where it starts);
    * the close and TTL deadlines are recomputed (a changed ``ttl`` applies to the key's next deadline;
      the caller sets the timers that changed).
    """
    old = st.layout
    legacy = old is None or not isinstance(old, list) or not old or old[0] != LAYOUT_VERSION
    key_same = legacy or old[1] == plan.layout[1]
    old_p = plan.p if legacy else old[3]
    if legacy:
        index = _legacy_index(st, plan)
    else:
        where = {tuple(m): j for j, m in enumerate(old[2])}
        index = {i: where[t] for i, t in enumerate(map(tuple, plan.layout[2])) if t in where}
    if not key_same:
        index = {}

    def remap(accs: list) -> list:
        out = []
        for i, fn in enumerate(plan.fns):
            j = index.get(i)
            acc = accs[j] if j is not None and j < len(accs) else None
            if j is None or (fn == "distinct" and old_p != plan.p and isinstance(acc, list) and acc[:1] == ["h"]):
                acc = M.new_acc(fn)
            out.append(acc)
        return out

    st.lifetime = remap(st.lifetime)
    g = plan.bucket_us
    buckets: dict = {}
    if g is not None and key_same:
        for b in sorted(st.buckets):
            accs = remap(st.buckets[b])
            nb = _floor(int(b), g)
            prev = buckets.get(nb)
            buckets[nb] = accs if prev is None else [
                M.merge(f, a, x, plan.threshold, plan.p) for f, a, x in zip(plan.fns, prev, accs)]
    st.buckets = buckets
    names = {w for w, _ in plan.windows}
    st.sigs = {w: s for w, s in st.sigs.items() if w in names and key_same}
    st.layout = plan.layout
    _prune(st, plan)
    st.close_at = _next_close(st, plan)
    if st.max_event_us > MIN_US:
        st.ttl_at = _ceil(st.max_event_us + plan.ttl_us, 1000)
    return st
