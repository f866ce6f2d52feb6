"""Prism with and without ``--experiments=prism_disable_sdf_split``: exactness of per-key state and throughput.

Runs the headwater-free reproduction of tests/state/test_prism_split.py (a splittable source of N
elements over 200 keys -> a stateful per-key count -> the counts at the end of the stream) R times
each way and prints, per run, the keys whose count is exact, the updates lost, and elements/s; then
the ratio of mean throughputs (with / without). JSON lines.

    python bench/prism_split_bench.py --n 20000 --runs 3 [--no-pause]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.state.test_prism_split as probe  # noqa: E402
from ingest.runner import runner_options  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-pause", action="store_true", help="no 300 ms pause every 500 elements")
    args = ap.parse_args()
    probe.N = args.n
    if args.no_pause:
        probe.PAUSE_S = 0.0
    rates: dict[str, list[float]] = {"with": [], "without": []}
    for run in range(args.runs):
        for way in ("without", "with"):
            argv = runner_options(True, [])
            if way == "without":
                argv = probe._without_experiments(argv)
            out = os.path.join(tempfile.mkdtemp(prefix="prism-split-"), "counts.txt")
            got, elapsed = probe._run(argv, out)
            expected = probe._expected()
            lost = {k: n - got.get(k, 0) for k, n in expected.items() if got.get(k, 0) != n}
            rate = args.n / elapsed
            rates[way].append(rate)
            print(json.dumps({"run": run, "experiment": way == "with", "n": args.n, "pause": not args.no_pause,
                              "keys_exact": len(expected) - len(lost), "keys": len(expected),
                              "updates_lost": sum(v for v in lost.values() if v > 0),
                              "max_lost_one_key": max(lost.values(), default=0),
                              "seconds": round(elapsed, 2), "elements_per_s": round(rate, 1)}), flush=True)
    print(json.dumps({"throughput_ratio_with_over_without":
                      round(statistics.mean(rates["with"]) / statistics.mean(rates["without"]), 3)}))


if __name__ == "__main__":
    main()
