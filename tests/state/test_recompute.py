"""state.recompute: a plain fold of the inputs equals what the stream's state emits, for every key and window.

The stream side is the real stateful DoFn on the DirectRunner with a TestStream (late data within the
allowed lateness, a TTL expiry followed by a new generation, HyperLogLog distinct counts); the
comparison is exact (metrics dicts equal), at each latest row's own watermark.
"""
from __future__ import annotations

import random

import apache_beam as beam
import orjson
from apache_beam.testing.test_stream import TestStream

from flatten.records import AggregateInput
from state import aggregate as A
from state.recompute import fold_state, fold_states, recompute, values_at
from state.spec import AggregateSpec, MetricSpec
from state.transform import ComputeAggregates
from tests.state.reference import Ev, window_at
from tests.state.streamkit import MIN, SINK, START, S, Collect, FixedClock, inp, latest, plain, streaming_options

METRICS = [MetricSpec(name="n", fn="count"), MetricSpec(name="amount", fn="sum", column="amount"),
           MetricSpec(name="lo", fn="min", column="amount"), MetricSpec(name="hi", fn="max", column="amount"),
           MetricSpec(name="mean", fn="avg", column="amount"), MetricSpec(name="skus", fn="distinct", column="sku"),
           MetricSpec(name="first", fn="first_seen"), MetricSpec(name="last", fn="last_seen"),
           MetricSpec(name="plan", fn="latest", column="plan")]
# distinct_exact_threshold 8 with 40 skus: most keys' distinct counts are HyperLogLog estimates
SPEC = AggregateSpec(name="activity", metrics=METRICS, windows=("lifetime", "1h"), emit_every="30s",
                     allowed_lateness="15m", ttl="3h", distinct_exact_threshold=8)
SPECS = {("p", "activity"): SPEC}


def _events(seed=7, n_users=30):
    """Events over 2 hours, then a second burst 5-6 h in for a third of the users (after their TTL)."""
    rnd = random.Random(seed)
    out = []
    for i in range(700):
        u = rnd.randrange(n_users)
        t = rnd.randrange(0, 120 * MIN) if i < 600 or u % 3 else rnd.randrange(300 * MIN, 360 * MIN)
        out.append((f"u{u}", t, i, {"amount": rnd.choice([1, 2, 0.25, -3.5, 1e-3, None]),
                                    "sku": f"s{rnd.randrange(40)}", "plan": rnd.choice(["free", "pro", None])}))
    return out


def _as_inputs(events) -> list[AggregateInput]:
    return [inp(k, t, i, **v).value for k, t, i, v in events]


def _stream(events, until_min: int, end_watermark_min: int):
    """10-minute slices of event time; a fifth of each slice arrives one slice late (within lateness)."""
    ts = TestStream().advance_processing_time(START).advance_watermark_to(0)
    rnd = random.Random(3)
    held: list = []
    for lo in range(0, until_min * MIN, 10 * MIN):
        batch = [e for e in events if lo <= e[1] < lo + 10 * MIN]
        now = [e for e in batch if rnd.random() > 0.2]
        if now or held:
            ts = ts.add_elements([inp(k, t, i, **v) for k, t, i, v in now + held])
        held = [e for e in batch if e not in now]
        ts = ts.advance_processing_time(31).advance_watermark_to((lo + 10 * MIN) // S)
    if held:
        ts = ts.add_elements([inp(k, t, i, **v) for k, t, i, v in held])
    return ts.advance_processing_time(31).advance_watermark_to(end_watermark_min * MIN // S).advance_processing_time(31)


def _run_stream(events, until_min, end_watermark_min, finals=True) -> dict:
    SINK.clear()
    with beam.Pipeline(options=streaming_options()) as p:
        out = (p | "Events" >> _stream(events, until_min, end_watermark_min)
               | "Aggregate" >> ComputeAggregates(SPECS, clock=FixedClock()))
        _ = out.aggregates | "Plain" >> beam.Map(plain) | "Collect" >> beam.ParDo(Collect("rows"))
        _ = out.dead_letter | "Reasons" >> beam.Map(lambda d: d.reason) | "CollectDL" >> beam.ParDo(Collect("dl"))
    assert SINK.get("dl", []) == []
    # the watermark jumps to +inf when a TestStream ends: the TTL rows come then; finals=False leaves them out
    return latest(r for r in SINK["rows"] if finals or not r[5])


def _check_equal(found: dict, events) -> None:
    as_of = {("p", "activity", k, w): wm for (k, w), (_, wm, _) in found.items()}
    expected = recompute(SPECS, sorted(_as_inputs(events), key=lambda x: (x.event_time_us, x.event_id)), as_of)
    assert set(expected) == {("p", "activity", k, w) for k, w in found}
    diffs = [(kw, m, expected[("p", "activity") + kw]) for kw, (m, _, _) in found.items()
             if m != expected[("p", "activity") + kw]]
    assert diffs == []


def test_recompute_equals_the_streams_final_rows_including_ttl_generations_and_hll():
    events = _events()
    found = _run_stream(events, until_min=360, end_watermark_min=400 * 24 * 60)
    assert all(f for _, _, f in found.values())  # every key ended with its TTL emission
    hll_keys = {k for (k, w), (m, _, _) in found.items() if w == "lifetime" and m["skus"] > 8}
    assert len(hll_keys) > 5  # HyperLogLog estimates are compared exactly too
    _check_equal(found, events)


def test_recompute_equals_the_streams_latest_rows_mid_stream():
    """No TTL yet: the latest rows are cadence and window-close rows with their own watermarks."""
    events = [e for e in _events(seed=5) if e[1] < 120 * MIN]
    found = _run_stream(events, until_min=120, end_watermark_min=125, finals=False)
    assert not any(f for _, _, f in found.values())
    wms = {wm for (_, w), (_, wm, _) in found.items() if w == "1h"}
    assert len(wms) > 1
    _check_equal(found, events)


def test_recompute_equals_an_independent_reference_when_exact():
    spec = SPEC.model_copy(update={"distinct_exact_threshold": 1000, "ttl": "30d"})
    events = [e for e in _events(seed=9) if e[1] < 120 * MIN]
    as_of = 200 * MIN
    got = recompute({("p", "activity"): spec}, _as_inputs(events),
                    {("p", "activity", e[0], w): as_of for e in events for w in spec.windows})
    by_key: dict = {}
    for k, t, i, v in events:
        by_key.setdefault(k, []).append(Ev(k, t, f"e{i:06d}", v))
    for k, evs in by_key.items():
        for w in spec.windows:
            ref = window_at(spec, evs, w, as_of)
            mine = got[("p", "activity", k, w)]
            for name, value in ref.items():
                if isinstance(value, float):
                    assert abs(mine[name] - value) <= 1e-12 * max(1.0, abs(value)), (k, w, name)
                else:
                    assert mine[name] == value, (k, w, name)


def test_order_does_not_matter_without_ttl_gaps_and_fold_state_dedups():
    events = [e for e in _events(seed=4) if e[1] < 120 * MIN]
    inputs = _as_inputs(events)
    shuffled = list(inputs)
    random.Random(1).shuffle(shuffled)
    assert recompute(SPECS, inputs) == recompute(SPECS, shuffled)
    plan = A.plan_for(SPEC)
    u0 = [x for x in inputs if x.key == "u0"]
    once = fold_state(plan, u0)
    twice = fold_state(plan, u0 + list(reversed(u0)))
    assert once is not None and once.to_bytes() == twice.to_bytes()
    assert values_at(once, plan, "lifetime")["n"] == len(u0)
    assert fold_states(SPECS, shuffled)[("p", "activity", "u0")].lifetime[0] == len(u0)


def test_a_gap_longer_than_ttl_starts_a_new_generation_and_bad_values_are_skipped():
    plan = A.plan_for(SPEC)
    mk = lambda i, t, **v: AggregateInput("p", "activity", "k", f"e{i}", t, orjson.dumps(v))  # noqa: E731
    ins = [mk(1, 0, amount=5), mk(2, 10 * MIN, amount=7), mk(3, 4 * 60 * MIN, amount=1),
           AggregateInput("p", "activity", "k", "e4", 4 * 60 * MIN + 1, b"[1]"),
           mk(5, 4 * 60 * MIN + 2, amount="x")]  # a type conflict: counted, not summed (as the stream does)
    st = fold_state(plan, ins)
    v = values_at(st, plan, "lifetime")
    assert (v["n"], v["amount"], v["first"]) == (2, 1, 4 * 60 * MIN)
    assert recompute(SPECS, ins, keys={("p", "activity", "other")}) == {}
