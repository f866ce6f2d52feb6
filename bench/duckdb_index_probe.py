"""How much memory DuckDB's PRIMARY KEY index (ART) takes while a table is written, per key type.

Not a test. Run::

    python bench/duckdb_index_probe.py [--rows 5000000] [--key varchar|uuid|none] [--memory-limit 250MB]
        [--reconnect-every N]

Inserts ``--rows`` rows of (32-hex-character row id, BIGINT) in 10,000-row statements into a fresh file, as
the warehouse sink does (``sinks/duckdb_store.py``: ``_row_id`` VARCHAR PRIMARY KEY, ids are hex digests),
and prints every million rows: CPU seconds so far, the process RSS and DuckDB's own memory by tag
(``duckdb_memory()``: ART_INDEX, BASE_TABLE...). The baseline is ``--key none`` (same rows, no key).
``--reconnect-every N`` closes and reopens the connection every N statements (what a writer that releases
the file does) and prints the latest close's (checkpoint's) time; ``--memory-limit`` sets DuckDB's limit
(the index is not evicted under it: the insert fails with an out-of-memory error once the index alone
exceeds it). Figures: bench/README.md, "Third pass".
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import tempfile
import time

import duckdb
import pyarrow as pa


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--key", choices=("varchar", "uuid", "none"), default="varchar")
    ap.add_argument("--memory-limit")
    ap.add_argument("--reconnect-every", type=int, default=0)
    args = ap.parse_args()
    path = os.path.join(tempfile.mkdtemp(prefix="hw-art-"), "probe.duckdb")

    def connect():
        con = duckdb.connect(path)
        con.execute("SET threads = 1")
        if args.memory_limit:
            con.execute(f"SET memory_limit = '{args.memory_limit}'")
        return con

    con = connect()
    key = {"varchar": "VARCHAR PRIMARY KEY", "uuid": "UUID PRIMARY KEY", "none": "VARCHAR"}[args.key]
    con.execute(f"CREATE TABLE t (_row_id {key}, v BIGINT)")
    batch, done, statements = 10_000, 0, 0
    closes: list = []  # (rows so far, wall s, CPU s) of each close (checkpoint)
    c0 = time.process_time()
    print(f"key={args.key} rows={args.rows:,} memory_limit={args.memory_limit} reconnect_every={args.reconnect_every}")
    while done < args.rows:
        ids = [hashlib.sha256(str(j).encode()).hexdigest()[:32] for j in range(done, done + batch)]
        tbl = pa.table({"_row_id": ids, "v": list(range(done, done + batch))})  # noqa: F841 - read by name
        con.execute("INSERT INTO t SELECT * FROM tbl")
        done += batch
        statements += 1
        if args.reconnect_every and statements % args.reconnect_every == 0:
            t0, k0 = time.perf_counter(), time.process_time()
            con.close()  # checkpoints
            closes.append((done, time.perf_counter() - t0, time.process_time() - k0))
            con = connect()
        if done % 1_000_000 == 0 or done >= args.rows:
            tags = dict(con.execute("SELECT tag, memory_usage_bytes FROM duckdb_memory() "
                                    "WHERE memory_usage_bytes > 1000000").fetchall())
            rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
            if closes:
                print(f"{'':>11}  close (checkpoint) at {closes[-1][0]:,} rows: {closes[-1][1]:.2f} s wall, "
                      f"{closes[-1][2]:.2f} CPU-s")
            print(f"{done:>11,} rows  cpu {time.process_time() - c0:7.1f}s  rss {rss:6,} MB  "
                  f"ART_INDEX {tags.get('ART_INDEX', 0) // 2**20:5,} MB ({tags.get('ART_INDEX', 0) / done:5.1f} B/row)  "
                  f"BASE_TABLE {tags.get('BASE_TABLE', 0) // 2**20:5,} MB", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024:,} MB")
    con.close()
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


if __name__ == "__main__":
    main()
