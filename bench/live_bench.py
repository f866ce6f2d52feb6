"""The live job on Prism with and without ``prism_disable_sdf_split``: throughput and exactness.

Publishes K Kafka + P Pub/Sub events over 300 users as fast as possible to a fresh contract (a copy of
examples/streaming.yaml on the local servers), runs the job in its own process (the `headwater run`
code path), and reports per run: seconds until every row landed (rows/s end to end), seconds until the
aggregates equal a recomputation from the warehouse rows (or the drift after a timeout), users whose
lifetime count is wrong. Then the ratio of row throughput with / without the experiment. JSON lines.

    PUBSUB_EMULATOR_HOST=127.0.0.1:8085 python bench/live_bench.py --kafka 20000 --pubsub 5000 --runs 3

Without the experiment (HEADWATER_PRISM_ALLOW_SPLITS=1 for the job) Prism may split bundles of the
stateful stage and lose updates; that mode exists for this measurement only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.publish import send_payloads  # noqa: E402
from tests.ingest import test_exactly_once as x  # noqa: E402


def one(kafka: int, pubsub: int, splits: bool, timeout: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="live-bench-"))
    contract, path = x._contract(tmp, "127.0.0.1:9092")
    km, ku = x._messages(contract, "orbit_live", kafka, seed=9)
    pm, pu = x._messages(contract, "acme_live", pubsub, seed=9)
    send_payloads(contract, "acme_live", [])
    total = {"orbit_live": kafka, "acme_live": pubsub}
    expected = x._expected_counts({"orbit_live": ku, "acme_live": pu})
    job = x.Job(path, tmp / "job.log", {"HEADWATER_PRISM_ALLOW_SPLITS": "1"} if splits else {})
    started = time.monotonic()
    job.start()
    rows_s = exact_s = None
    try:
        for t in x._publish_in_background(contract, {"orbit_live": km, "acme_live": pm}, rate=0):
            t.join()
        while time.monotonic() - started < timeout:
            try:
                rows = x._rows(contract)
            except Exception:  # noqa: BLE001 - file locked by a write
                time.sleep(0.5)
                continue
            if rows_s is None and all(rows[p][0] >= n for p, n in total.items()):
                rows_s = time.monotonic() - started
            if rows_s is not None and x._settled(contract, total, expected):
                exact_s = time.monotonic() - started
                break
            time.sleep(1.0)
    finally:
        job.stop()
    drift, counts = x._aggregate_state(contract)
    wrong = sum(1 for k, n in expected.items() if counts.get(k) != n)
    return {"splits_allowed": splits, "events": kafka + pubsub, "rows_landed_s": rows_s,
            "rows_per_s": round((kafka + pubsub) / rows_s, 1) if rows_s else None,
            "aggregates_exact_s": exact_s, "aggregate_rows_drifting": len(drift),
            "users_wrong": wrong, "users": len(expected)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kafka", type=int, default=20000)
    ap.add_argument("--pubsub", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=420)
    args = ap.parse_args()
    rates: dict[bool, list[float]] = {True: [], False: []}
    for run in range(args.runs):
        for splits in (True, False):
            r = one(args.kafka, args.pubsub, splits, args.timeout)
            r["run"] = run
            if r["rows_per_s"]:
                rates[splits].append(r["rows_per_s"])
            print(json.dumps(r), flush=True)
    if rates[True] and rates[False]:
        print(json.dumps({"rows_per_s_ratio_disabled_over_allowed":
                          round(statistics.mean(rates[False]) / statistics.mean(rates[True]), 3)}))


if __name__ == "__main__":
    main()
