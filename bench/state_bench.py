"""Benchmark of the stateful aggregation step (issue 5).

Reports events/s through ComputeAggregates on the local batch runner (FnApiRunner, the runner the
DirectRunner falls back to when Prism is unavailable) with N distinct users, on 1 and 2 worker
processes, for several ``--max_cache_memory_usage_mb`` values; the bytes of state per key; and the
pure ``step()`` rate without Beam as a ceiling.

    python bench/state_bench.py --users 100000 --events-per-user 2 --cores 1 2 --cache-mb 0 100

The events/s figure is (events) / (pipeline wall time - wall time of the same pipeline without the
stateful step), i.e. the cost the stateful step adds. Results are printed as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import apache_beam as beam
import orjson
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from flatten.records import AggregateInput
from state import aggregate as A
from state.spec import AggregateSpec, MetricSpec
from state.transform import ComputeAggregates

DAY_US = 86400 * 1_000_000
T0 = 1_700_000_000_000_000
SPEC = AggregateSpec(
    name="activity",
    metrics=[MetricSpec(name="events", fn="count"), MetricSpec(name="revenue", fn="sum", column="amount"),
             MetricSpec(name="skus", fn="distinct", column="sku"), MetricSpec(name="plan", fn="latest", column="plan"),
             MetricSpec(name="last", fn="last_seen")],
    windows=("lifetime", "7d"), emit_every="60s", allowed_lateness="1h", ttl="30d")


def _events_for(user: int, per_user: int) -> list[beam.window.TimestampedValue]:
    rnd = random.Random(user)
    out = []
    for j in range(per_user):
        t = T0 + rnd.randrange(0, 14 * DAY_US)
        inp = AggregateInput("bench", "activity", f"user-{user:06d}", f"e{user}-{j}", t,
                             orjson.dumps({"amount": rnd.randrange(1, 100), "sku": f"s{rnd.randrange(50)}",
                                           "plan": rnd.choice(["free", "pro"])}))
        out.append(beam.window.TimestampedValue(inp, t / 1e6))
    return out


def _run(users: int, per_user: int, cores: int, cache_mb: int, stateful: bool) -> float:
    opts = PipelineOptions(direct_num_workers=cores, direct_running_mode="multi_processing",
                           max_cache_memory_usage_mb=cache_mb)
    t = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner(), options=opts) as p:
        evs = (p | "Users" >> beam.Create(range(users)) | "Reshard" >> beam.Reshuffle()
               | "Events" >> beam.FlatMap(_events_for, per_user).with_output_types(AggregateInput))
        if stateful:
            rows = (evs | "Aggregate" >> ComputeAggregates({("bench", "activity"): SPEC})).aggregates
        else:
            rows = evs | "KeyOnly" >> beam.Map(lambda e: ((e.partner, e.aggregate, e.key), e)) | "Group" >> beam.GroupByKey()
        _ = rows | "Count" >> beam.combiners.Count.Globally() | "Drop" >> beam.Map(lambda n: None)
    return time.perf_counter() - t


def state_size(per_user_events: int = 20) -> dict:
    plan = A.plan_for(SPEC)
    st = None
    for tv in _events_for(1, per_user_events):
        e = tv.value
        st, _ = A.step(st, A.Event(e.event_time_us, e.event_id, orjson.loads(e.values)), plan)
    return {"events_per_key": per_user_events, "state_bytes": len(st.to_bytes()), "buckets": len(st.buckets)}


def pure_rate(n: int = 50_000) -> float:
    plan = A.plan_for(SPEC)
    evs = [tv.value for u in range(n // 5) for tv in _events_for(u, 5)]
    states: dict = {}
    t = time.perf_counter()
    for e in evs:
        raw = states.get(e.key)
        st = A.AggState.from_bytes(raw) if raw else None
        st, _ = A.step(st, A.Event(e.event_time_us, e.event_id, orjson.loads(e.values)), plan)
        states[e.key] = st.to_bytes()
    return len(evs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--events-per-user", type=int, default=2)
    ap.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cache-mb", type=int, nargs="+", default=[0, 100])
    args = ap.parse_args()
    print(json.dumps({"state_size": [state_size(n) for n in (1, 5, 20, 200)]}), flush=True)
    print(json.dumps({"pure_step_events_per_s": round(pure_rate())}), flush=True)
    n = args.users * args.events_per_user
    for cores in args.cores:
        base = _run(args.users, args.events_per_user, cores, 0, stateful=False)
        for cache in args.cache_mb:
            wall = _run(args.users, args.events_per_user, cores, cache, stateful=True)
            print(json.dumps({"users": args.users, "events": n, "cores": cores, "cache_mb": cache,
                              "wall_s": round(wall, 1), "baseline_s": round(base, 1),
                              "events_per_s_total": round(n / wall),
                              "events_per_s_stateful_step": round(n / max(wall - base, 1e-9))}), flush=True)


if __name__ == "__main__":
    main()
