"""What versioned aggregate state costs: bytes per state and time per event (ratios, same process).

    python bench/layout_bench.py

* bytes: the ``layout`` record every AggState now carries, against the same state without it;
* time: decode + step + encode of one event (what the stateful DoFn does per element) with the
  state's layout equal to the plan's (the normal case: one list comparison), against a first touch
  that migrates legacy positional state, against the bare step on an in-memory state (no codec).
"""
from __future__ import annotations

import time

import orjson

from state import aggregate as A
from state.spec import AggregateSpec, MetricSpec

H = 3600 * 1_000_000


def _state(plan):
    st = None
    for i in range(48):
        st, _ = A.step(st, A.Event(i * H, f"e{i}", {"amount": i, "sku": f"s{i % 7}"}), plan)
    return st


def _per_event(fn, n: int = 5000) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    spec = AggregateSpec(name="activity", metrics=[
        MetricSpec(name="events", fn="count"), MetricSpec(name="spend", fn="sum", column="amount"),
        MetricSpec(name="skus", fn="distinct", column="sku")], windows=("lifetime", "1d", "7d"))
    plan = A.plan_for(spec)
    st = _state(plan)
    current = st.to_bytes()
    d = orjson.loads(current)
    del d["layout"]
    legacy = orjson.dumps(d)
    ev = A.Event(49 * H, "x", {"amount": 1, "sku": "s1"})

    def roundtrip(raw):
        def go():
            s, _ = A.step(A.AggState.from_bytes(raw), ev, plan)
            s.to_bytes()
        return go

    in_memory = A.AggState.from_bytes(current)
    bare = _per_event(lambda: A.step(in_memory, ev, plan))
    same = _per_event(roundtrip(current))
    migrate = _per_event(roundtrip(legacy))
    print(f"state bytes: {len(current)} with layout, {len(legacy)} without "
          f"(+{len(current) - len(legacy)} B, x{len(current) / len(legacy):.2f})")
    print(f"per event: decode+step+encode {same * 1e6:.1f} us (layout equal), first touch migrating legacy "
          f"state {migrate * 1e6:.1f} us (x{migrate / same:.2f}), step alone in memory {bare * 1e6:.1f} us")


if __name__ == "__main__":
    main()
