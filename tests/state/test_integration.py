"""1,000 users streamed through the local streaming runner; final aggregates equal a plain-Python reference.

Runner: the DirectRunner with ``streaming=True`` (BundleBasedDirectRunner: the only local runner that
runs processing-time timers; Prism is not available on this machine yet), no TestStream: real clock,
processing-time emissions every second, watermark driven by the source.
"""
from __future__ import annotations

import random

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from state.spec import AggregateSpec, MetricSpec
from state.transform import ComputeAggregates
from tests.state.reference import Ev, final_rows
from tests.state.streamkit import MIN, SINK, Collect, bounded, inp, plain

SPEC = AggregateSpec(
    name="activity",
    metrics=[MetricSpec(name="n", fn="count"), MetricSpec(name="amount", fn="sum", column="amount"),
             MetricSpec(name="hi", fn="max", column="amount"), MetricSpec(name="mean", fn="avg", column="amount"),
             MetricSpec(name="skus", fn="distinct", column="sku"), MetricSpec(name="first", fn="first_seen"),
             MetricSpec(name="last", fn="last_seen"), MetricSpec(name="plan", fn="latest", column="plan")],
    windows=("lifetime", "1h"), emit_every="1s", allowed_lateness="1h", ttl="2h")


def test_thousand_users_streaming_equals_reference():
    rnd = random.Random(11)
    events = []
    for u in range(1000):
        for _ in range(rnd.randint(1, 6)):
            events.append((f"user-{u:04d}", 1_700_000_000_000_000 + rnd.randrange(0, 90 * MIN), len(events),
                           {"amount": rnd.randrange(-50, 500), "sku": f"s{rnd.randrange(30)}",
                            "plan": rnd.choice(["free", "pro", "team"])}))
    rnd.shuffle(events)
    SINK.clear()
    with beam.Pipeline(options=PipelineOptions(streaming=True, runner="DirectRunner")) as p:
        out = bounded(p, [inp(k, t, i, **v) for k, t, i, v in events]) | "Aggregate" >> ComputeAggregates(
            {("p", "activity"): SPEC}, streaming=True)
        _ = out.aggregates | "Plain" >> beam.Map(plain) | "Collect" >> beam.ParDo(Collect("rows"))
        _ = out.dead_letter | "CollectDead" >> beam.ParDo(Collect("dead"))
    assert SINK.get("dead", []) == []
    rows = SINK["rows"]
    finals = {(r[0], r[1]): r[2] for r in rows if r[5]}
    ref = final_rows(SPEC, [Ev(k, t, f"e{i:06d}", v) for k, t, i, v in events])
    assert len({k for k, _ in ref}) == 1000
    assert finals == ref
    # one final row per (key, window); versions strictly increase per (key, window)
    assert sum(1 for r in rows if r[5]) == len(finals)
    by_kw: dict = {}
    for r in rows:
        by_kw.setdefault((r[0], r[1]), []).append(r[4])
    assert all(len(set(v)) == len(v) for v in by_kw.values())
