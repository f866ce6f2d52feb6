"""Events/s of the demo pipeline on the local batch runner, 1 and 2 workers (a figure, not a test).

    python bench/pipeline_bench.py [--events N] [--modes in_memory,multi_threading,multi_processing]

Generates the demo's three partners (N events each), runs the whole job
(parse, mask, dedup, flatten, aggregates, DuckDB) per configuration and prints
records/s, plus the ratio to a baseline measured in the same process: the
same records through ``orjson.loads`` alone, single-threaded.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.demo import example_contract_path, generate  # noqa: E402
from ingest.contract import load_contract  # noqa: E402
from ingest.pipeline import run  # noqa: E402


def baseline(root: Path) -> float:
    lines = []
    for f in (root / "data").rglob("*.jsonl*"):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rb") as fh:
            lines += [ln for ln in fh.read().split(b"\n") if ln.strip()]
    t0 = time.perf_counter()
    for ln in lines:
        try:
            orjson.loads(ln)
        except orjson.JSONDecodeError:
            pass
    return len(lines) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=5000, help="events per partner")
    ap.add_argument("--configs", default="1:in_memory,2:multi_threading,2:multi_processing")
    args = ap.parse_args()
    os.environ.setdefault("HEADWATER_MASK_KEY", "bench-key-0123456789abcdef0123456789")
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        root = Path("headwater-demo")
        counts = generate(root, args.events)
        total = sum(counts.values())
        base = baseline(root)
        print(f"{total:,} records; baseline orjson.loads alone: {base:,.0f} records/s")
        print(f"{'workers':>7} {'mode':<17} {'seconds':>8} {'records/s':>10} {'vs baseline':>11}")
        contract = load_contract(example_contract_path())
        for cfg in args.configs.split(","):
            workers, mode = cfg.split(":")
            Path(contract.warehouse.path).unlink(missing_ok=True)
            t0 = time.perf_counter()
            run(contract, [f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"])
            dt = time.perf_counter() - t0
            print(f"{workers:>7} {mode:<17} {dt:>8.1f} {total / dt:>10,.0f} {total / dt / base:>10.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
