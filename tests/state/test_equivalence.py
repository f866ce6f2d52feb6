"""Stream versus bounded backfill: one event set, equal final aggregates (late data within lateness included)."""
from __future__ import annotations

import random

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to

from state.spec import AggregateSpec, MetricSpec
from state.transform import ComputeAggregates
from tests.state.reference import Ev, final_rows
from tests.state.streamkit import END, SINK, Collect, bounded, MIN, START, S, FixedClock, inp, plain, streaming_options

SPEC = AggregateSpec(
    name="activity",
    metrics=[MetricSpec(name="n", fn="count"), MetricSpec(name="amount", fn="sum", column="amount"),
             MetricSpec(name="lo", fn="min", column="amount"), MetricSpec(name="hi", fn="max", column="amount"),
             MetricSpec(name="mean", fn="avg", column="amount"), MetricSpec(name="skus", fn="distinct", column="sku"),
             MetricSpec(name="first", fn="first_seen"), MetricSpec(name="last", fn="last_seen"),
             MetricSpec(name="plan", fn="latest", column="plan")],
    windows=("lifetime", "1h"), emit_every="30s", allowed_lateness="15m", ttl="3h", distinct_exact_threshold=8)
SPECS = {("p", "activity"): SPEC}


def _events(n_users=40, n_events=600, seed=7):
    """Events over 2 hours; each batch also carries some events up to 10 minutes late."""
    rnd = random.Random(seed)
    out = []
    for i in range(n_events):
        t = rnd.randrange(0, 120 * MIN)
        out.append((f"u{rnd.randrange(n_users)}", t, i, {"amount": rnd.choice([1, 2, 0.25, -3.5, None]),
                                                          "sku": f"s{rnd.randrange(15)}",
                                                          "plan": rnd.choice(["free", "pro", None])}))
    return out


def _finals(rows):
    return {(r[0], r[1]): (r[2], r[3]) for r in rows if r[5]}


def _stream(events):
    """Arrive in 10-minute slices of event time; 20% of each slice is held back and arrives one slice late
    (5-10 min behind the watermark: within the 15 min allowed lateness)."""
    ts = TestStream().advance_processing_time(START).advance_watermark_to(0)
    rnd = random.Random(3)
    held = []
    for lo in range(0, 120 * MIN, 10 * MIN):
        batch = [e for e in events if lo <= e[1] < lo + 10 * MIN]
        now = [e for e in batch if rnd.random() > 0.2]
        ts = ts.add_elements([inp(k, t, i, **v) for k, t, i, v in now + held])
        held = [e for e in batch if e not in now]
        ts = ts.advance_processing_time(31).advance_watermark_to((lo + 10 * MIN) // S)
    ts = ts.add_elements([inp(k, t, i, **v) for k, t, i, v in held]).advance_processing_time(31)
    return ts.advance_watermark_to(END)


def test_stream_and_backfill_give_equal_final_aggregates():
    events = _events()
    SINK.clear()

    with beam.Pipeline(options=streaming_options()) as p:
        out = p | "Events" >> _stream(events) | "Aggregate" >> ComputeAggregates(SPECS, clock=FixedClock())
        _ = out.aggregates | "Plain" >> beam.Map(plain) | "Collect" >> beam.ParDo(Collect("stream"))
        # every late event is within the allowed lateness: no dead letters
        assert_that(out.dead_letter | "DL" >> beam.Map(lambda d: d.reason), equal_to([]), label="NoDeadLetters")
    with beam.Pipeline(options=PipelineOptions(runner="DirectRunner")) as p:
        out = bounded(p, [inp(k, t, i, **v) for k, t, i, v in events]) | "Aggregate" >> ComputeAggregates(SPECS)
        _ = out.aggregates | "Plain" >> beam.Map(plain) | "Collect" >> beam.ParDo(Collect("backfill"))

    stream, backfill = _finals(SINK["stream"]), _finals(SINK["backfill"])
    assert len(stream) == 2 * len({e[0] for e in events})
    assert stream == backfill
    # and both equal the plain-Python reference
    ref = final_rows(SPEC, [Ev(k, t, f"e{i:06d}", v) for k, t, i, v in events])
    for kw, (metrics, _) in stream.items():
        assert metrics.keys() == ref[kw].keys()
        for name, value in metrics.items():
            assert value == (round(ref[kw][name], 9) if isinstance(value, float) else ref[kw][name]) or \
                abs(value - ref[kw][name]) < 1e-9, (kw, name)
    # the backfill emits no processing-time panes, only closes and finals: fewer rows
    assert len(SINK["backfill"]) < len(SINK["stream"])


def test_bounded_combine_equals_the_stateful_bounded_variant():
    """Backfills combine each key's events (lifted partial merges) into one final row per (key, window);
    the stateful DoFn on the same bounded input must produce exactly those final rows (values, as-of
    times, versions) among its rows, and the same dead letters."""
    events = _events(n_users=25, n_events=400, seed=11)
    events.append(("u1", 30 * MIN, 10_000, {"amount": "not a number", "sku": "s1", "plan": "pro"}))
    SINK.clear()
    for name, fold in (("fold", True), ("stateful", False)):
        with beam.Pipeline(options=PipelineOptions(runner="DirectRunner")) as p:
            out = bounded(p, [inp(k, t, i, **v) for k, t, i, v in events]) | "Aggregate" >> ComputeAggregates(
                SPECS, fold_bounded=fold)
            _ = out.aggregates | "Plain" >> beam.Map(plain) | "Collect" >> beam.ParDo(Collect(name))
            _ = out.dead_letter | "DLReason" >> beam.Map(_dl_key) | "CollectDL" >> beam.ParDo(Collect(name + "_dl"))
    # the combine emits final rows only (the stateful variant also replays the close panes)
    assert sorted(map(repr, SINK["fold"])) == sorted(map(repr, [r for r in SINK["stateful"] if r[5]]))
    assert len(SINK["fold"]) == 2 * len({e[0] for e in events})
    # one dead letter per metric that cannot use the value (sum, min, max, avg of amount)
    assert sorted(SINK["fold_dl"]) == sorted(SINK["stateful_dl"]) == [("type_conflict", "activity:u1#e010000")] * 4


def _dl_key(d):
    return d.reason, d.coords
