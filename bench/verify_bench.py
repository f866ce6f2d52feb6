"""Benchmark of `headwater verify` on the DuckDB warehouse (issue 10, item 4).

Builds a warehouse of N events over U users (rows written by the real DuckDB store, aggregate rows
from the recomputation itself, so the run is exact), then times:

* baseline: reading the same columns in the same order with plain DuckDB (``fetchmany``), no Python work;
* the reader alone (``aggregate_inputs_from_warehouse``: typing values back, building AggregateInputs);
* the whole ``verify`` (reader + fold with the stream's ``step`` + comparison).

    python bench/verify_bench.py --events 100000 --users 5000

Prints one JSON line with events/s of each and the ratios to the baseline.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import orjson

from flatten.records import AggregateRow, TableRow
from ingest.contract import parse_contract
from sinks.duckdb_store import DuckDBWarehouse, open_readonly
from sinks.warehouse_reader import aggregate_inputs_from_warehouse, specs_of
from state import aggregate as A
from state.recompute import fold_states

T0 = 1_767_225_600_000_000  # 2026-01-01


def _contract(path: str):
    return parse_contract({
        "warehouse": {"kind": "duckdb", "path": path},
        "partners": [{"name": "bench", "sources": [{"kind": "file", "pattern": "/dev/null"}],
                      "table": {"name": "bench_events"},
                      "aggregates": [{"name": "activity", "windows": ["lifetime", "7d"], "metrics": [
                          {"name": "events", "fn": "count"}, {"name": "revenue", "fn": "sum", "column": "amount"},
                          {"name": "skus", "fn": "distinct", "column": "sku"},
                          {"name": "plan", "fn": "latest", "column": "plan"}]}]}]})


def _ts(us: int) -> str:
    secs, frac = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:06d}Z"


def build(path: str, events: int, users: int, seed: int = 1) -> None:
    contract = _contract(path)
    p = contract.partners[0]
    wh = DuckDBWarehouse(contract.warehouse, {p.name: p.table}, {p.name: p.flatten.schema_mode})
    rnd = random.Random(seed)
    types = orjson.dumps({"_event_id": "STRING", "_user_id": "STRING", "_event_time": "TIMESTAMP",
                          "amount": "FLOAT64", "sku": "STRING", "plan": "STRING"})
    batch = []
    for i in range(events):
        t = T0 + rnd.randrange(0, 20 * 86400) * 1_000_000 + i
        row = {"_event_id": f"e{i}", "_user_id": f"u{rnd.randrange(users)}", "_event_time": _ts(t),
               "amount": round(rnd.uniform(1, 100), 2), "sku": f"s{rnd.randrange(200)}",
               "plan": rnd.choice(["free", "pro", "team"])}
        batch.append(TableRow(p.name, p.table.name, f"e{i}", f"e{i}", t, orjson.dumps(row), types))
        if len(batch) == 50_000:
            wh.write_rows(batch)
            batch = []
    wh.write_rows(batch)
    # aggregate rows as the stream would have emitted them after the last event (exact by construction)
    specs = specs_of(contract)
    plans = {k: A.plan_for(s) for k, s in specs.items()}
    rows = []
    for (partner, agg, key), st in fold_states(specs, aggregate_inputs_from_warehouse(contract)).items():
        plan = plans[(partner, agg)]
        for window, length in plan.windows:
            rows.append(AggregateRow(partner, agg, key, window, orjson.dumps(A.window_value(st, plan, length, st.clock_us)),
                                     st.clock_us, st.clock_us, st.clock_us, False))
    wh.write_aggregates(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=5_000)
    args = ap.parse_args()
    from deploy.verify import verify

    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "bench.duckdb")
        t = time.perf_counter()
        build(path, args.events, args.users)
        built = time.perf_counter() - t
        contract = _contract(path)

        con = open_readonly(path)
        t = time.perf_counter()
        cur = con.execute('SELECT "_event_id", "_user_id", "_event_time", "amount", "sku", "plan" FROM bench_events '
                          "ORDER BY _event_time, _event_id")
        n = 0
        while True:
            page = cur.fetchmany(10_000)
            if not page:
                break
            n += len(page)
        base = time.perf_counter() - t
        con.close()

        t = time.perf_counter()
        m = sum(1 for _ in aggregate_inputs_from_warehouse(contract))
        read = time.perf_counter() - t

        t = time.perf_counter()
        report = verify(contract)
        full = time.perf_counter() - t
    assert n == m == args.events and report.ok, (n, m, report.ok)
    print(json.dumps({
        "events": args.events, "users": args.users, "build_s": round(built, 1),
        "baseline_scan_events_per_s": round(n / base), "reader_events_per_s": round(m / read),
        "verify_events_per_s": round(args.events / full), "verify_s": round(full, 2),
        "reader_vs_scan": round(base / read, 3), "verify_vs_scan": round(base / full, 3),
        "keys_checked": sum(a.keys for a in report.aggregates),
    }))


if __name__ == "__main__":
    main()
