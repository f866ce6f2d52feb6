"""Versioned aggregate state: state written under one spec is migrated on first touch under another.

Old-layout bytes are produced the way the code before versioned state wrote them (an orjson dict of the
AggState fields without ``layout``, accumulators positional), then fed to the pure functions with a new
spec. No Beam except the last tests, which drive the stateful DoFn's timer path with in-memory cells.
"""
from __future__ import annotations

import orjson
import pytest

from state import aggregate as A
from state.spec import AggregateSpec, MetricSpec

S = 1_000_000
H = 3600 * S
D = 24 * H


def spec(*metrics, windows=("lifetime",), key="user_id", p=12, threshold=1000, ttl="30d", name="act"):
    return AggregateSpec(name=name, key=key, metrics=[MetricSpec(**m) for m in metrics], windows=windows,
                         ttl=ttl, allowed_lateness="1h", hll_precision=p, distinct_exact_threshold=threshold)


COUNT = {"name": "events", "fn": "count"}
SPEND = {"name": "spend", "fn": "sum", "column": "amount"}
SKUS = {"name": "skus", "fn": "distinct", "column": "sku"}
TOP = {"name": "top", "fn": "max", "column": "amount"}


def feed(plan, events, st=None):
    for i, (t, values) in enumerate(events):
        st, rej = A.step(st, A.Event(t, f"e{t}-{i}", values), plan)
        assert not rej
    return st


def legacy_bytes(st: A.AggState) -> bytes:
    """The bytes the code before versioned state wrote: no layout field, positional accumulators."""
    d = orjson.loads(st.to_bytes())
    del d["layout"]
    return orjson.dumps(d)


def lifetime(st, plan, as_of=None):
    return A.window_value(st, plan, None, st.clock_us if as_of is None else as_of)


EVENTS = [(i * H, {"amount": i, "sku": f"s{i % 3}"}) for i in range(1, 6)]


def test_layout_round_trips_and_is_recorded():
    plan = A.plan_for(spec(COUNT, SPEND))
    st = feed(plan, EVENTS)
    assert st.layout == [A.LAYOUT_VERSION, "user_id", [["events", "count", None], ["spend", "sum", "amount"]],
                         12, None, ["lifetime"], 30 * D]
    again = A.AggState.from_bytes(st.to_bytes())
    assert again.layout == plan.layout and again == st


def test_old_format_bytes_decode_and_an_appended_metric_starts_empty():
    old_plan = A.plan_for(spec(COUNT, SPEND))
    old = A.AggState.from_bytes(legacy_bytes(feed(old_plan, EVENTS)))
    assert old.layout is None
    new_plan = A.plan_for(spec(COUNT, SPEND, TOP))
    st = feed(new_plan, [(6 * H, {"amount": 7})], old)  # the bug was IndexError here
    assert lifetime(st, new_plan) == {"events": 6, "spend": 22, "top": 7}
    assert st.layout is new_plan.layout
    assert A.AggState.from_bytes(st.to_bytes()).layout == new_plan.layout


def test_old_format_bytes_with_the_last_metric_removed():
    old = A.AggState.from_bytes(legacy_bytes(feed(A.plan_for(spec(COUNT, SPEND, TOP)), EVENTS)))
    new_plan = A.plan_for(spec(COUNT, SPEND))
    st, rows = A.emit(old, new_plan)
    assert [r.metrics for r in rows] == [{"events": 5, "spend": 15}]


def test_old_format_bytes_whose_accumulator_does_not_fit_the_new_fn_start_empty():
    old = A.AggState.from_bytes(legacy_bytes(feed(A.plan_for(spec(SPEND, COUNT)), EVENTS)))
    new_plan = A.plan_for(spec(COUNT, SPEND))  # swapped kinds: a count cannot hold a sum's accumulator
    st = feed(new_plan, [(6 * H, {"amount": 1})], old)
    assert lifetime(st, new_plan) == {"events": 1, "spend": 1}


def test_old_format_bytes_with_the_same_spec_change_nothing():
    plan = A.plan_for(spec(COUNT, SPEND, SKUS, windows=("lifetime", "1d")))
    cur = feed(plan, EVENTS)
    old = A.AggState.from_bytes(legacy_bytes(cur))
    st = feed(plan, [(6 * H, {"amount": 1, "sku": "z"})], old)
    ref = feed(plan, [(6 * H, {"amount": 1, "sku": "z"})], A.AggState.from_bytes(cur.to_bytes()))
    assert st == ref


def test_metrics_are_matched_by_name_when_inserted_reordered_and_removed():
    old_plan = A.plan_for(spec(COUNT, SPEND, SKUS, windows=("lifetime", "1d")))
    old = A.AggState.from_bytes(feed(old_plan, EVENTS).to_bytes())
    new_plan = A.plan_for(spec(SKUS, TOP, COUNT, windows=("lifetime", "1d")))  # spend removed, top inserted
    st, rows = A.emit(old, new_plan)
    got = {r.window: r.metrics for r in rows}
    assert got["lifetime"] == {"skus": 3, "top": None, "events": 5}
    assert got["1d"] == {"skus": 3, "top": None, "events": 5}
    assert all(len(accs) == 3 for accs in st.buckets.values())


def test_a_metric_whose_fn_or_column_changed_starts_empty():
    old = A.AggState.from_bytes(feed(A.plan_for(spec(COUNT, SPEND)), EVENTS).to_bytes())
    new_plan = A.plan_for(spec(COUNT, {"name": "spend", "fn": "sum", "column": "price"}))
    st = feed(new_plan, [(6 * H, {"price": 2})], old)
    assert lifetime(st, new_plan) == {"events": 6, "spend": 2}


def test_added_window_is_computed_from_then_on_and_timers_follow():
    old = A.AggState.from_bytes(feed(A.plan_for(spec(COUNT)), EVENTS).to_bytes())
    assert old.close_at is None and old.buckets == {}
    new_plan = A.plan_for(spec(COUNT, windows=("lifetime", "1d")))
    st = feed(new_plan, [(6 * H, {}), (7 * H, {})], old)
    assert st.close_at is not None  # the new sliding window sets its close timer
    st, rows = A.on_close(st, new_plan, st.close_at)
    assert {r.window: r.metrics["events"] for r in rows} == {"1d": 2}  # only events after the migration
    _, rows = A.expire(st, new_plan, st.ttl_at)
    assert {r.window: r.metrics["events"] for r in rows} == {"lifetime": 7, "1d": 0}  # 30d later


def test_removed_window_stops_and_its_buckets_go():
    old = A.AggState.from_bytes(feed(A.plan_for(spec(COUNT, windows=("lifetime", "1d"))), EVENTS).to_bytes())
    assert old.buckets and old.close_at is not None
    new_plan = A.plan_for(spec(COUNT))
    st, rows = A.emit(old, new_plan)
    assert [r.window for r in rows] == ["lifetime"] and st.buckets == {} and st.close_at is None
    assert set(st.sigs) == {"lifetime"}


def test_coarser_buckets_merge_exactly():
    old_plan = A.plan_for(spec(COUNT, SPEND, windows=("1d", "7d")))  # 1h buckets
    new_plan = A.plan_for(spec(COUNT, SPEND, windows=("7d",)))  # 1d buckets
    assert (old_plan.bucket_us, new_plan.bucket_us) == (H, D)
    events = [(D + i * 5 * H + 17, {"amount": i}) for i in range(30)]
    migrated = A.migrate(A.AggState.from_bytes(feed(old_plan, events).to_bytes()), new_plan)
    fresh = feed(new_plan, events)
    assert migrated.buckets == fresh.buckets
    for as_of in (5 * D, 7 * D + H, 8 * D):
        assert A.window_value(migrated, new_plan, 7 * D, as_of) == A.window_value(fresh, new_plan, 7 * D, as_of)


def test_finer_buckets_keep_old_buckets_at_their_start():
    old_plan = A.plan_for(spec(COUNT, windows=("7d",)))  # 1d buckets
    new_plan = A.plan_for(spec(COUNT, windows=("1d", "7d")))  # 1h buckets
    events = [(D + 5 * H, {}), (2 * D + 7 * H, {})]
    st = A.migrate(A.AggState.from_bytes(feed(old_plan, events).to_bytes()), new_plan)
    assert sorted(st.buckets) == [D, 2 * D]
    assert A.window_value(st, new_plan, 7 * D, 3 * D) == {"events": 2}


def test_changed_key_resets_accumulators_but_versions_keep_increasing():
    plan = A.plan_for(spec(COUNT))
    st, rows = A.emit(feed(plan, EVENTS), plan)
    v = rows[-1].version
    new_plan = A.plan_for(spec(COUNT, key="account__id"))
    st = feed(new_plan, [(6 * H, {})], A.AggState.from_bytes(st.to_bytes()))
    st, rows = A.emit(st, new_plan)
    assert rows[0].metrics == {"events": 1} and rows[0].version > v


def test_hll_precision_change_resets_sketches_but_keeps_exact_sets():
    many = [(i * S, {"sku": f"s{i}"}) for i in range(1, 40)]
    old_plan = A.plan_for(spec(SKUS, COUNT, threshold=10, p=12))
    sketched = A.AggState.from_bytes(feed(old_plan, many).to_bytes())
    assert sketched.lifetime[0][0] == "h"
    new_plan = A.plan_for(spec(SKUS, COUNT, threshold=10, p=10))
    st = A.migrate(sketched, new_plan)
    assert st.lifetime == [["x", []], 39]
    few = A.AggState.from_bytes(feed(old_plan, many[:5]).to_bytes())
    assert A.migrate(few, new_plan).lifetime[0] == few.lifetime[0]


def test_ttl_change_moves_the_deadline():
    old = A.AggState.from_bytes(feed(A.plan_for(spec(COUNT, ttl="30d")), EVENTS).to_bytes())
    new_plan = A.plan_for(spec(COUNT, ttl="2d"))
    old_deadline = old.ttl_at
    st, rows = A.expire(old, new_plan, 5 * H + 2 * D + 1000)
    assert st is None and rows and old_deadline > 5 * H + 2 * D + 1000


# ---------------------------------------------------------------- the DoFn's timer path (removed aggregates, moved TTL)


class _Cell:
    def __init__(self, raw=None):
        self.raw = raw

    def read(self):
        return self.raw

    def write(self, raw):
        self.raw = raw

    def clear(self):
        self.raw = None


class _Timer:
    def __init__(self, at=None):
        self.at = at

    def set(self, ts):
        self.at = ts.micros

    def clear(self):
        self.at = None


def _fn(specs):
    from state.transform import _StreamingAggregateFn

    fn = _StreamingAggregateFn(specs, "Headwater/ComputeAggregates/AggregatePerKey", lambda: 1_000.0)
    fn.setup()
    return fn


@pytest.mark.parametrize("which", ["emit", "close", "ttl", "probe"])
def test_timer_of_a_removed_aggregate_clears_the_key(which):
    from apache_beam.utils.timestamp import Timestamp

    plan = A.plan_for(spec(COUNT, windows=("lifetime", "1d")))
    st = feed(plan, EVENTS)
    cell = _Cell(st.to_bytes())
    timers = (_Timer(1), _Timer(st.close_at), _Timer(st.ttl_at), _Timer(st.probe_at))
    fn = _fn({("p", "other"): spec(COUNT, name="other")})  # aggregate 'act' removed from the contract
    out = list(fn._timer(which, ("p", "act", "u1"), Timestamp(micros=st.close_at), cell, timers))
    assert out == [] and cell.raw is None and all(t.at is None for t in timers)


def test_ttl_timer_firing_after_a_longer_ttl_sets_the_new_deadline():
    from apache_beam.utils.timestamp import Timestamp

    st = feed(A.plan_for(spec(COUNT, ttl="2d")), EVENTS)
    cell = _Cell(legacy_bytes(st))
    timers = (_Timer(), _Timer(), _Timer(st.ttl_at), _Timer(st.probe_at))
    fired = st.ttl_at
    timers[2].at = None  # the runner delivered it: no longer set
    fn = _fn({("p", "act"): spec(COUNT, ttl="30d")})
    out = list(fn._timer("ttl", ("p", "act", "u1"), Timestamp(micros=fired), cell, timers))
    assert out == []  # not expired: the deadline moved
    new = A.AggState.from_bytes(cell.raw)
    assert new.ttl_at == 5 * H + 30 * D and timers[2].at == new.ttl_at
