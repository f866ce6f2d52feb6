"""Pure tests of state.combine: partials merged in any order equal the spec's fold (aggregate.step + expire)."""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from state import aggregate as A
from state import combine as C
from state.spec import AggregateSpec
from tests.state.test_aggregate import SPEC as ACTIVITY

S = 1_000_000
MIN = 60 * S
H = 3600 * S
D = 24 * H

METRICS = list(ACTIVITY.metrics)  # every metric function once (tests/state/test_aggregate.py)
SPECS = [
    AggregateSpec(name="a", metrics=METRICS, windows=("lifetime", "1h"), ttl="2h", allowed_lateness="10m",
                  distinct_exact_threshold=6),
    AggregateSpec(name="b", metrics=METRICS, windows=("lifetime", "1d", "7d", "30d"), ttl="30d",
                  allowed_lateness="1h"),
    AggregateSpec(name="c", metrics=METRICS, windows=("7d", "lifetime"), ttl="8d", allowed_lateness="1h",
                  window_bucket="1h"),
    AggregateSpec(name="d", metrics=METRICS, windows=("lifetime",), ttl="1d", allowed_lateness="1h"),
]


def spec_fold(events, plan):
    """What the bounded fold computed: step over (time, id) order, then expire at the TTL deadline."""
    stt = None
    rejections = []
    for t, eid, values in sorted(events, key=lambda e: (e[0], e[1])):
        stt, rej = A.step(stt, A.Event(t, eid, values), plan)
        rejections += [(eid, r) for r in rej]
    _, rows = A.expire(stt, plan, stt.ttl_at)
    return [r for r in rows if r.final], rejections


def combined(events, plan, rnd):
    """Events split into random partials, merged in random order (what lifting + the shuffle do)."""
    rnd.shuffle(events)
    k = rnd.randint(1, min(6, len(events)))
    cuts = sorted(rnd.sample(range(1, len(events)), k - 1)) if k > 1 else []
    parts, rejections = [], []
    for lo, hi in zip([0, *cuts], [*cuts, len(events)]):
        p = C.new_partial(plan)
        for t, eid, values in events[lo:hi]:
            rejections += [(eid, r) for r in C.add_event(p, t, eid, values, plan)]
        parts.append(p)
    rnd.shuffle(parts)
    acc = parts[0]
    for p in parts[1:]:
        acc = C.merge_partials(acc, p, plan) if rnd.random() < 0.5 else C.merge_partials(p, acc, plan)
    return C.final_rows(acc, plan), rejections


def random_events(rnd, n, span_us, t0=1_780_000_000 * S):
    out = []
    for i in range(n):
        out.append((t0 + rnd.randrange(span_us), f"e{i:05d}",
                    {"amount": rnd.choice([1, 2, 0.1, 0.25, -3.5, 1e16, None, "x"]), "sku": f"s{rnd.randrange(9)}",
                     "plan": rnd.choice(["free", "pro", None])}))
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**9), n=st.integers(1, 80), spec_i=st.integers(0, len(SPECS) - 1),
       span=st.sampled_from([30 * MIN, 5 * H, 3 * D, 60 * D]))
def test_partials_in_any_order_equal_the_spec_fold(seed, n, spec_i, span):
    rnd = random.Random(seed)
    plan = A.plan_for(SPECS[spec_i])
    events = random_events(rnd, n, span)
    want, want_rej = spec_fold(list(events), plan)
    got, got_rej = combined(list(events), plan, rnd)
    assert got == want  # values, as-of time, versions, final flags, window order
    assert sorted(got_rej) == sorted(want_rej)


def test_exact_boundaries_and_whole_day_times():
    """Event times on bucket and day boundaries (where close panes and the TTL deadline can coincide)."""
    rnd = random.Random(4)
    for spec in SPECS:
        plan = A.plan_for(spec)
        events = [(1_780_000_000 * S - (1_780_000_000 * S) % D + k * D + rnd.choice([0, 0, H, 1]), f"e{k}",
                   {"amount": k, "sku": f"s{k % 3}", "plan": "pro"}) for k in range(40)]
        want, _ = spec_fold(list(events), plan)
        got, _ = combined(list(events), plan, rnd)
        assert [(r.window, r.metrics, r.watermark_us, r.final) for r in got] == \
            [(r.window, r.metrics, r.watermark_us, r.final) for r in want]


def test_one_final_row_per_window_and_old_buckets_dropped():
    plan = A.plan_for(SPECS[1])
    p = C.new_partial(plan)
    for d in range(200):  # 200 days of one event a day: only ~30 + a few buckets are kept
        C.add_event(p, 1_780_000_000 * S + d * D, f"e{d}", {"amount": 1, "sku": "s", "plan": "x"}, plan)
    assert len(p[2]) <= 33
    rows = C.final_rows(p, plan)
    assert [r.window for r in rows] == ["lifetime", "1d", "7d", "30d"]
    assert rows[0].metrics["events"] == 200 and all(r.final for r in rows)


ODD_VALUES = [1, 2, -7, 0, 10**30, -(10**25), 0.1, 0.25, -3.5, 1e16, 1e308, float("inf"), float("-inf"),
              float("nan"), True, False, None, "x", "1", "", {"a": 1}, [1, 2], 2.0, -0.0]


# distinct keys values by their JSON text: what orjson cannot write (ints past 64 bits) never reaches it (parsed JSON)
SKU_VALUES = [v for v in ODD_VALUES if not (isinstance(v, int) and abs(v) >= 2**63)] + [f"s{k}" for k in range(9)]


def _odd_events(rnd, n, span_us, t0=1_780_000_000 * S):
    """Events whose metric values are every odd case: big ints, non-finite floats, bools, text, objects, nulls."""
    return [(t0 + rnd.randrange(span_us), f"e{rnd.randrange(n):05d}",
             {"amount": rnd.choice(ODD_VALUES), "sku": rnd.choice(SKU_VALUES),
              "plan": rnd.choice(ODD_VALUES + ["free", "pro"])}) for _ in range(n)]


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 10**9), n=st.integers(1, 120), spec_i=st.integers(0, len(SPECS) - 1),
       span=st.sampled_from([30 * MIN, 5 * H, 3 * D, 60 * D, 400 * D]), odd=st.booleans())
def test_the_compiled_adder_folds_exactly_what_add_event_folds(seed, n, spec_i, span, odd):
    """``adder`` (the bounded fold's hot path: metrics unrolled, common cases inline) against ``add_event`` (the
    reference): the same partial after every event, with the same types (1 stays an int, 2.0 a float), and the
    same rejections in the same order."""
    rnd = random.Random(seed)
    plan = A.plan_for(SPECS[spec_i])
    cols = ("plan", "amount", "sku")  # any order: the values tuple follows it
    add = C.adder(plan, cols)
    events = (_odd_events if odd else random_events)(rnd, n, span)
    want, got = C.new_partial(plan), C.new_partial(plan)
    for t, eid, values in events:
        want_rej = C.add_event(want, t, eid, values, plan)
        got_rej = add(got, t, eid, tuple(values.get(c) for c in cols))
        assert list(got_rej) == want_rej
        assert repr(got) == repr(want)  # repr: exact types, and nan equal to nan
    assert _outcome(C.final_rows, got, plan) == _outcome(C.final_rows, want, plan)


def _outcome(fn, *args) -> str:
    """repr of what ``fn`` returns; nothing may raise (a sum past the number range is a string: state.metrics)."""
    return repr(fn(*args))


def test_the_compiled_adder_takes_a_short_values_tuple_as_missing_columns():
    plan = A.plan_for(SPECS[0])
    add = C.adder(plan, ("amount", "sku", "plan"))
    want, got = C.new_partial(plan), C.new_partial(plan)
    C.add_event(want, 1_780_000_000 * S, "e1", {"amount": 3}, plan)
    add(got, 1_780_000_000 * S, "e1", (3,))
    assert repr(got) == repr(want)
