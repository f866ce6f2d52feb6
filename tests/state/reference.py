"""Plain-Python reference for per-key aggregates, written independently of state/.

It recomputes values from the full event list (no buckets, no accumulators),
so a test that compares the Beam output with it can catch arithmetic and
windowing bugs in state.aggregate / state.metrics.
"""
from __future__ import annotations

import math

import orjson
from typing import Any, Iterable, NamedTuple, Optional

from state.spec import AggregateSpec, parse_duration_s


class Ev(NamedTuple):
    key: str
    t_us: int
    event_id: str
    values: dict


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics_of(spec: AggregateSpec, evs: list[Ev]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in spec.metrics:
        vals = [e.values.get(m.column) for e in evs] if m.column else []
        nums = [v for v in vals if _num(v)]
        present = [v for v in vals if v is not None]
        if m.fn == "count":
            out[m.name] = len(evs)
        elif m.fn == "sum":
            out[m.name] = (sum(nums) if all(isinstance(v, int) for v in nums) else math.fsum(nums)) if nums else None
        elif m.fn == "avg":
            out[m.name] = math.fsum(nums) / len(nums) if nums else None
        elif m.fn == "min":
            out[m.name] = min(nums) if nums else None
        elif m.fn == "max":
            out[m.name] = max(nums) if nums else None
        elif m.fn == "distinct":

            out[m.name] = len({orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in present})
        elif m.fn == "first_seen":
            out[m.name] = min((e.t_us for e in evs), default=None)
        elif m.fn == "last_seen":
            out[m.name] = max((e.t_us for e in evs), default=None)
        elif m.fn == "latest":
            cands = [(e.t_us, e.event_id, e.values.get(m.column)) for e in evs if e.values.get(m.column) is not None]
            out[m.name] = max(cands)[2] if cands else None
    return out


def bucket_us(spec: AggregateSpec) -> Optional[int]:
    b = spec.bucket_s()
    return None if b is None else b * 1_000_000


def window_at(spec: AggregateSpec, evs: list[Ev], window: str, as_of_us: int) -> dict[str, Any]:
    """Value of ``window`` as of ``as_of_us`` (exclusive), bucket-aligned like docs/state.md says."""
    if window == "lifetime":
        return metrics_of(spec, evs)
    g = bucket_us(spec)
    n = int(spec.sliding_windows_s()[window]) * 1_000_000
    end = -((-as_of_us) // g) * g
    return metrics_of(spec, [e for e in evs if end - n <= e.t_us < end])


def final_rows(spec: AggregateSpec, events: Iterable[Ev]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(key, window): metrics} of the final (TTL) emission for every key."""
    by_key: dict[str, list[Ev]] = {}
    for e in events:
        by_key.setdefault(e.key, []).append(e)
    ttl = int(parse_duration_s(spec.ttl) * 1_000_000)
    out = {}
    for k, evs in by_key.items():
        t_final = max(e.t_us for e in evs) + ttl
        for w in spec.windows:
            out[(k, w)] = window_at(spec, evs, w, t_final)
    return out
