"""DuckDB sink writes of a live job's size: a connection per write vs the held write connection (issue 13).

Not a test. ``python bench/duckdb_write_bench.py [--rows 50] [--writes 40]``: the same small batches of
rows and aggregate rows written by ``DuckDBWarehouse`` with a connection per write (connect, metadata DDL,
schema query, insert, close = checkpoint) and with ``keep_open=True`` (what the streaming sink uses), into
a warehouse that already holds 20,000 rows. Prints CPU and wall milliseconds per write and the ratios.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from flatten.options import SchemaMode  # noqa: E402
from flatten.records import AggregateRow, TableRow  # noqa: E402
from sinks.duckdb_store import DuckDBWarehouse, release_held  # noqa: E402
from sinks.spec import TableSpec, WarehouseSpec  # noqa: E402

TYPES = orjson.dumps({"_event_id": "STRING", "_event_time": "TIMESTAMP", "_user_id": "STRING",
                      "amount": "FLOAT64", "n": "INT64"})


def rows(batch: int, n: int) -> list[TableRow]:
    return [TableRow("p", "t", f"r{batch}-{i}", f"e{batch}-{i}", 0, orjson.dumps(
        {"_event_id": f"e{batch}-{i}", "_event_time": "2026-12-01T00:00:00Z", "_user_id": f"u{i % 100}",
         "amount": 1.5, "n": i}), TYPES) for i in range(n)]


def aggs(batch: int, n: int) -> list[AggregateRow]:
    return [AggregateRow("p", "a", f"u{i}", "lifetime", b'{"events":1}', 0, batch, 0, False) for i in range(n)]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(keep_open: bool, n: int, writes: int) -> "tuple[float, float]":
    path = Path(tempfile.mkdtemp(prefix="hw-duckdb-write-")) / "w.duckdb"
    wh = DuckDBWarehouse(WarehouseSpec(path=str(path)), {"p": TableSpec(name="t")}, {"p": SchemaMode.EVOLVE},
                         keep_open=keep_open)
    for k in range(4):
        wh.write_rows(rows(10_000 + k, 5000))
    c0, t0 = cpu(), time.perf_counter()
    for k in range(writes):
        wh.write_rows(rows(k, n))
        wh.write_aggregates(aggs(k, n))
    c, t = cpu() - c0, time.perf_counter() - t0
    release_held()
    return 1000 * c / (2 * writes), 1000 * t / (2 * writes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=50, help="rows per write")
    ap.add_argument("--writes", type=int, default=40, help="writes of each kind (rows, aggregates)")
    args = ap.parse_args()
    per_c, per_t = measure(False, args.rows, args.writes)
    held_c, held_t = measure(True, args.rows, args.writes)
    print(f"{args.rows} rows per write, {2 * args.writes} writes (rows + aggregates), table of 20,000 rows")
    print(f"  connection per write:  {per_c:6.1f} CPU-ms  {per_t:6.1f} wall-ms per write")
    print(f"  held connection:       {held_c:6.1f} CPU-ms  {held_t:6.1f} wall-ms per write "
          f"(includes its releases: idle {0.5}s / age 1s)")
    print(f"  ratio per write / held: CPU {per_c / held_c:.1f}x, wall {per_t / held_t:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
