"""Pure tests of state.aggregate / state.metrics: no Beam."""
from __future__ import annotations

import random

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from state import aggregate as A
from state import metrics as M
from state.spec import AggregateSpec, MetricSpec
from tests.state.reference import Ev, final_rows, window_at

S = 1_000_000
MIN = 60 * S
H = 3600 * S

SPEC = AggregateSpec(
    name="activity",
    metrics=[
        MetricSpec(name="events", fn="count"),
        MetricSpec(name="amount", fn="sum", column="amount"),
        MetricSpec(name="lo", fn="min", column="amount"),
        MetricSpec(name="hi", fn="max", column="amount"),
        MetricSpec(name="mean", fn="avg", column="amount"),
        MetricSpec(name="skus", fn="distinct", column="sku"),
        MetricSpec(name="first", fn="first_seen"),
        MetricSpec(name="last", fn="last_seen"),
        MetricSpec(name="plan", fn="latest", column="plan"),
    ],
    windows=("lifetime", "1h"),
    emit_every="60s",
    allowed_lateness="10m",
    ttl="2h",
    distinct_exact_threshold=50,
)
PLAN = A.plan_for(SPEC)


def ev(t_us, i, **values):
    return A.Event(t_us, f"e{i:05d}", values)


def run(events, plan=PLAN):
    st = None
    for e in events:
        st, rej = A.step(st, e, plan)
        assert not rej
    return st


def test_plan_bucket_and_units():
    assert PLAN.bucket_us == MIN  # 1h window -> 1 minute buckets (60 per window)
    assert PLAN.lateness_us == 10 * MIN and PLAN.ttl_us == 2 * H and PLAN.probe_us == 150 * S


def test_lifetime_metrics_match_reference():
    rnd = random.Random(1)
    evs = [ev(rnd.randrange(0, 50 * MIN), i, amount=rnd.choice([1, 2.5, -3, None]), sku=f"s{rnd.randrange(20)}",
              plan=rnd.choice(["free", "pro"])) for i in range(300)]
    st = run(evs)
    got = A.window_value(st, PLAN, None, st.clock_us)
    ref = final_rows(SPEC, [Ev("k", e.event_time_us, e.event_id, e.values) for e in evs])[("k", "lifetime")]
    assert got == pytest.approx(ref)


def test_sliding_window_is_bucket_aligned():
    evs = [ev(0, 1, amount=1), ev(59 * MIN, 2, amount=2), ev(61 * MIN + 5 * S, 3, amount=4)]
    st = run(evs)
    # as of 61m05s (exclusive end rounds up to 62m): buckets [2m, 62m) -> events 2 and 3 only
    assert A.window_value(st, PLAN, H, st.clock_us)["amount"] == 6
    ref = window_at(SPEC, [Ev("k", e.event_time_us, e.event_id, e.values) for e in evs], "1h", st.clock_us)
    assert ref["amount"] == 6


def test_emit_only_changed_windows_and_versions_increase():
    st = run([ev(10 * S, 1, amount=1)])
    st, rows = A.emit(st, PLAN)
    assert {r.window for r in rows} == {"lifetime", "1h"}
    assert all(r.watermark_us == 10 * S + 1 and not r.final for r in rows)
    v = max(r.version for r in rows)
    st, rows = A.emit(st, PLAN)
    assert rows == []  # nothing changed
    st, _ = A.step(st, ev(20 * S, 2, plan="pro"), PLAN)
    st, rows = A.emit(st, PLAN)
    assert [r.window for r in rows] == ["lifetime", "1h"] and min(r.version for r in rows) > v


def test_close_drops_old_buckets_and_schedules_next():
    st = run([ev(30 * S, 1, amount=5)])
    assert st.close_at == MIN  # the bucket [0, 1m) completes
    st, rows = A.on_close(st, PLAN, MIN)
    assert [(r.window, r.metrics["amount"], r.watermark_us) for r in rows] == [("1h", 5, MIN)]
    assert st.close_at == H + MIN  # ... and leaves the 1h window at 61m
    st, rows = A.on_close(st, PLAN, H + MIN)
    assert rows[0].metrics["events"] == 0 and st.buckets == {} and st.close_at is None


def test_late_event_rejected_against_known_watermark():
    st = run([ev(0, 1)])
    st = A.on_probe(st, PLAN, 30 * MIN)
    assert st.known_wm_us == 30 * MIN
    st, rej = A.step(st, ev(20 * MIN, 2), PLAN)  # within 10m lateness
    assert rej == []
    before = st.to_bytes()
    st, rej = A.step(st, ev(19 * MIN, 3), PLAN)  # 30m - 10m = 20m > 19m
    assert [r.reason for r in rej] == ["late"] and st.to_bytes() == before


def test_probe_backs_off_while_idle_and_stops_at_ttl():
    st = run([ev(0, 1)])
    assert st.probe_at == PLAN.probe_us
    times = []
    while st.probe_at is not None:
        times.append(st.probe_at)
        st = A.on_probe(st, PLAN, st.probe_at)
    assert len(times) < 8 and times[-1] < st.ttl_at
    assert all(b - a > 0 for a, b in zip(times, times[1:]))


def test_expire_emits_final_and_clears_and_version_keeps_growing():
    st = run([ev(0, 1, amount=3)])
    st, rows = A.emit(st, PLAN)
    v = max(r.version for r in rows)
    assert A.expire(st, PLAN, 10 * S) == (st, [])  # stale TTL timer: deadline is later
    new, rows = A.expire(st, PLAN, st.ttl_at)
    # closes still due come first (the window's on-time pane and its decay), then the final rows
    assert [(r.window, r.metrics["events"], r.final) for r in rows] == [
        ("1h", 1, False), ("1h", 0, False), ("lifetime", 1, True), ("1h", 0, True)]
    rows = [r for r in rows if r.final]
    assert next(r for r in rows if r.window == "lifetime").metrics["amount"] == 3
    assert next(r for r in rows if r.window == "1h").metrics["events"] == 0
    vf = max(r.version for r in rows)
    assert vf > v
    st2, _ = A.step(None, ev(2 * H + 5 * S, 2), PLAN)  # the key comes back: a new generation
    _, rows2 = A.emit(st2, PLAN)
    assert min(r.version for r in rows2) > vf and rows2[0].metrics["events"] == 1


def test_type_conflict_is_reported_and_rest_applied():
    st, rej = A.step(None, ev(0, 1, amount="12", sku="a"), PLAN)
    assert {r.reason for r in rej} == {"type_conflict"}
    vals = A.window_value(st, PLAN, None, st.clock_us)
    assert vals["events"] == 1 and vals["skus"] == 1 and vals["amount"] is None


def test_state_roundtrip_bytes():
    st = run([ev(i * S, i, amount=i * 0.1, sku=f"s{i}") for i in range(80)])  # crosses the HLL threshold
    assert st.lifetime[5][0] == "h"
    again = A.AggState.from_bytes(st.to_bytes())
    assert again == st


def test_distinct_switches_to_hll_within_documented_error():
    spec = SPEC.model_copy(update={"distinct_exact_threshold": 100})
    plan = A.plan_for(spec)
    st = run([ev(i, i, sku=f"sku-{i}") for i in range(20000)], plan)
    est = A.window_value(st, plan, None, st.clock_us)["skus"]
    assert abs(est - 20000) / 20000 < 4 * M.hll_relative_error(12)  # 4 sigma of 1.6%


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 90 * 60), st.sampled_from([1, 2, 0.1, 0.7, -5, None]),
                          st.sampled_from(["a", "b", "c"]), st.sampled_from(["free", "pro", None])),
                min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_order_independence(rows, rnd):
    """Any arrival order gives byte-identical window values (what backfill equivalence rests on)."""
    evs = [ev(t * S, i, amount=a, sku=s, plan=p) for i, (t, a, s, p) in enumerate(rows)]
    shuffled = list(evs)
    rnd.shuffle(shuffled)
    a, b = run(evs), run(shuffled)
    w = max(a.clock_us, b.clock_us)
    for length in (None, H):
        assert orjson.dumps(A.window_value(a, PLAN, length, w)) == orjson.dumps(A.window_value(b, PLAN, length, w))


def test_float_sum_is_exact_regardless_of_order():
    vals = [1e16, 1.0, -1e16, 1.0] * 10
    accs = []
    for order in (vals, list(reversed(vals)), sorted(vals)):
        acc = M.new_acc("sum")
        for v in order:
            acc = M.add("sum", acc, v, 0, "", 10, 12)
        accs.append(M.result("sum", acc, 12))
    assert accs == [20.0, 20.0, 20.0]


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="ttl"):
        AggregateSpec(name="a", metrics=[MetricSpec(name="n", fn="count")], windows=("30d",), ttl="7d")
    with pytest.raises(ValueError, match="window_bucket"):
        AggregateSpec(name="a", metrics=[MetricSpec(name="n", fn="count")], windows=("7d",), window_bucket="5h")
    assert AggregateSpec(name="a", metrics=[MetricSpec(name="n", fn="count")], windows=("7d", "1d")).bucket_s() == 3600
