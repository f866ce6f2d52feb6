"""Recompute per-key aggregates from a plain list of inputs, with the stream's own arithmetic. No Beam.

``headwater verify`` reads the warehouse's rows back as :class:`AggregateInput` values
(``sinks.warehouse_reader``) and folds them here; a restart can rebuild one key's state
with :func:`fold_state`. Both call :func:`state.aggregate.step` and
:func:`state.aggregate.window_value`, the functions the stateful DoFn calls, so a
recomputation cannot disagree with the stream by construction: HyperLogLog registers,
exact float sums (Shewchuk partials), ``latest`` tie-breaks and sliding-window bucket
alignment are the same code.

What the stream's state holds after all inputs, and what is folded here:

* every accepted input exactly once (the caller passes each event once: the warehouse
  keeps one row per event id; :func:`fold_state` also drops repeated event ids);
* inputs the stream rejected as ``late`` are not in the state: the caller leaves them out
  (``headwater verify`` reads them from the dead letters). Type conflicts are rejected by
  ``step`` itself, here as in the stream;
* TTL: a key silent for ``ttl`` of event time is cleared and its next event starts a new
  generation. Here a new generation starts when an input's event time reaches the
  state's TTL deadline (``AggState.ttl_at``), which needs the inputs of a key in event-time
  order (the warehouse reader yields them so). This assumes the watermark passed the
  deadline before that event arrived, as it does for a live stream whose gaps are
  longer than the watermark lag; a key silent for *about* ``ttl`` may differ.
  Every other metric is order-independent (state/metrics.py), so apart from TTL the
  order of inputs does not matter;
* the as-of time of a window: the value of a sliding window depends on the time it is
  read at. By default a window is read at the state's clock (latest event time + 1 us),
  as the stream's cadence emission after the last event does; ``as_of`` maps a
  ``(partner, aggregate, key, window)`` to another time (verify passes each aggregate
  row's ``watermark_us``; an as-of before the state's clock is raised to it, since a row
  cannot legitimately reflect less than every event).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import orjson

from flatten.records import AggregateInput
from state import aggregate as A
from state.spec import AggregateSpec

__all__ = ["recompute", "fold_state", "fold_states", "values_at", "AggKey", "WindowKey"]

AggKey = tuple[str, str, str]  # (partner, aggregate, key)
WindowKey = tuple[str, str, str, str]  # (partner, aggregate, key, window)


def _event(inp: AggregateInput) -> Optional[A.Event]:
    """The pure step's event, or None for inputs the stream dead-letters before any state
    (values that are not a JSON object)."""
    try:
        values = orjson.loads(inp.values)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(values, dict):
        return None
    return A.Event(inp.event_time_us, inp.event_id, values)


def _apply(st: Optional[A.AggState], inp: AggregateInput, plan: A.Plan) -> Optional[A.AggState]:
    ev = _event(inp)
    if ev is None:
        return st
    if st is not None and st.ttl_at is not None and ev.event_time_us >= st.ttl_at:
        st = None  # the previous generation expired (TTL) before this event: it starts afresh
    st, _rejections = A.step(st, ev, plan)  # late rejections cannot occur: no watermark is learnt here
    return st


def fold_state(plan: A.Plan, inputs: Iterable[AggregateInput]) -> Optional[A.AggState]:
    """The state one key holds after ``inputs`` (all of the same (partner, aggregate, key)).

    Inputs are folded in (event time, event id) order, repeated event ids once, so the
    result does not depend on the order given. None when no input was usable.
    Timers in the returned state (``close_at``, ``ttl_at``, ``probe_at``) are the ones
    the stream would have set after the last event; ``dirty`` is True.
    """
    st: Optional[A.AggState] = None
    seen: set[str] = set()
    for inp in sorted(inputs, key=lambda i: (i.event_time_us, i.event_id)):
        if inp.event_id in seen:
            continue
        seen.add(inp.event_id)
        st = _apply(st, inp, plan)
    return st


def fold_states(specs: Mapping[tuple[str, str], AggregateSpec],
                inputs: Iterable[AggregateInput],
                keys: Optional[set[AggKey]] = None) -> dict[AggKey, A.AggState]:
    """Fold a stream of inputs of many keys, one state per key, without holding the inputs.

    For exact TTL generations, each key's inputs must come in event-time order (the warehouse
    reader's order); inputs of unknown (partner, aggregate) pairs are skipped, as are keys not
    in ``keys`` when it is given.
    """
    plans = {k: A.plan_for(s) for k, s in specs.items()}
    states: dict[AggKey, A.AggState] = {}
    for inp in inputs:
        plan = plans.get((inp.partner, inp.aggregate))
        if plan is None:
            continue
        k = (inp.partner, inp.aggregate, inp.key)
        if keys is not None and k not in keys:
            continue
        st = _apply(states.get(k), inp, plan)
        if st is not None:
            states[k] = st
    return states


def values_at(st: A.AggState, plan: A.Plan, window: str, as_of_us: Optional[int] = None) -> dict[str, Any]:
    """Metric values of ``window`` of a folded state, as of ``max(as_of_us, st.clock_us)``."""
    length = dict(plan.windows)[window]
    w = st.clock_us if as_of_us is None else max(as_of_us, st.clock_us)
    return A.window_value(st, plan, length, w)


def recompute(specs: Mapping[tuple[str, str], AggregateSpec], inputs: Iterable[AggregateInput],
              as_of: Optional[Mapping[WindowKey, int]] = None,
              keys: Optional[set[AggKey]] = None) -> dict[WindowKey, dict[str, Any]]:
    """``{(partner, aggregate, key, window): metrics}``: the values the stream's state holds
    after ``inputs``, for every window of every key that has at least one usable input.

    ``specs`` maps ``(partner, aggregate name)`` to the spec, as ``ComputeAggregates`` takes it.
    ``as_of`` (optional) gives the as-of time per window row (see the module docstring);
    ``keys`` restricts the result to those (partner, aggregate, key).
    """
    as_of = as_of or {}
    plans = {k: A.plan_for(s) for k, s in specs.items()}
    out: dict[WindowKey, dict[str, Any]] = {}
    for (partner, agg, key), st in fold_states(specs, inputs, keys).items():
        plan = plans[(partner, agg)]
        for window, _length in plan.windows:
            wk = (partner, agg, key, window)
            out[wk] = values_at(st, plan, window, as_of.get(wk))
    return out
