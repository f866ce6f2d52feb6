"""The streaming sink's held write connection (``DuckDBWarehouse(keep_open=True)``, issue 13).

What must hold while a live job keeps the DuckDB file open between writes:

* what a write returned is durable: a SIGKILL right after it loses nothing (the ledger commits the
  source offsets / acks on that promise);
* other processes still get in: a reader using ``open_readonly`` opens the file while writes keep
  coming (release for age) and right after they stop (release when idle);
* the schema known in-process follows schema evolution, and a write after a release re-reads it;
* a read-only open in the same process releases the writer (DuckDB refuses a second configuration);
* the rows are those a connection per write stores.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest

from flatten.options import SchemaMode
from flatten.records import AggregateRow, TableRow
from sinks import duckdb_store
from sinks.duckdb_store import DuckDBWarehouse, open_readonly, release_held
from sinks.spec import TableSpec, WarehouseSpec

ROOT = Path(__file__).resolve().parents[2]


def _wh(path: Path, keep_open: bool = True) -> DuckDBWarehouse:
    return DuckDBWarehouse(WarehouseSpec(path=str(path)), {"acme": TableSpec(name="t")},
                           {"acme": SchemaMode.EVOLVE}, keep_open=keep_open)


def _rows(start: int, n: int, extra: dict | None = None) -> list[TableRow]:
    out = []
    for i in range(start, start + n):
        cols = {"_event_id": f"e{i}", "_event_time": "2026-12-01T00:00:00Z", "_user_id": f"u{i % 7}", "n": i,
                **(extra or {})}
        types = {"_event_id": "STRING", "_event_time": "TIMESTAMP", "_user_id": "STRING", "n": "INT64",
                 **{k: "STRING" for k in (extra or {})}}
        out.append(TableRow("acme", "t", f"r{i}", f"e{i}", 1_780_000_000_000_000, orjson.dumps(cols),
                            orjson.dumps(types)))
    return out


def _count(path: Path, sql: str = "SELECT count(*) FROM t"):
    con = open_readonly(str(path))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _reader_count(path: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """Another process reads the file through open_readonly (what verify, tests and the demo do)."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from sinks.duckdb_store import open_readonly
        t0 = time.monotonic()
        con = open_readonly({str(path)!r}, timeout_s={timeout_s})
        n = con.execute("SELECT count(*) FROM t").fetchone()[0]
        print(n, round(time.monotonic() - t0, 3))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s + 60)


@pytest.fixture(autouse=True)
def _release():
    yield
    release_held()


def test_held_connection_stays_open_between_writes_and_closes_when_idle(tmp_path):
    path = tmp_path / "w.duckdb"
    wh = _wh(path)
    held = duckdb_store._held_for(str(path))
    wh.write_rows(_rows(0, 10))
    first = held.con
    assert first is not None, "the write connection is kept after the write"
    wh.write_rows(_rows(10, 10))
    assert held.con is first, "a second write right after reuses it"
    deadline = time.monotonic() + 30
    while held.con is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.con is None, f"not released after {duckdb_store.HOLD_IDLE_S}s idle"
    assert _reader_count(path, 5.0).stdout.split()[0] == "20"


def test_reader_gets_in_while_writes_keep_coming(tmp_path):
    """Continuous small writes (a busy stream) never leave the file idle: the release for age lets the
    reader in well within open_readonly's timeout."""
    path = tmp_path / "w.duckdb"
    wh = _wh(path)
    wh.write_rows(_rows(0, 5))
    stop = threading.Event()
    written = [5]

    def writer():
        i = 5
        while not stop.is_set():
            wh.write_rows(_rows(i, 5))
            i += 5
            written[0] = i

    th = threading.Thread(target=writer)
    th.start()
    try:
        time.sleep(0.5)
        res = _reader_count(path, 20.0)
    finally:
        stop.set()
        th.join()
    assert res.returncode == 0, res.stderr
    n, waited = res.stdout.split()
    assert 5 <= int(n) <= written[0]
    assert float(waited) < 20.0
    assert _count(path) == [(written[0],)]


def test_write_that_returned_survives_sigkill(tmp_path):
    """kill -9 right after a write returned (the held connection never closed, no checkpoint): every row
    of that write is in the file when it is opened again."""
    path = tmp_path / "w.duckdb"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_duckdb_held import _rows, _wh
        from sinks import duckdb_store
        duckdb_store.HOLD_IDLE_S = duckdb_store.HOLD_MAX_S = 3600.0  # never released before the kill
        wh = _wh({str(path)!r})
        for k in range(5):
            wh.write_rows(_rows(k * 100, 100, {{"late": "x"}} if k == 3 else None))
        wh.write_aggregates([AggregateRow("acme", "a", f"u{{i}}", "lifetime", b'{{"n":1}}', 0, 1, 0, False)
                             for i in range(50)])
        print("written", flush=True)
        time.sleep(3600)
    """).replace("from test_duckdb_held", "from flatten.records import AggregateRow\nfrom test_duckdb_held")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        line = proc.stdout.readline()
        assert line.strip() == "written"
        assert duckdb_store.os.path.exists(str(path) + ".wal"), "the writes sit in the WAL, not checkpointed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert _count(path) == [(500,)]
    assert _count(path, "SELECT count(*) FROM t WHERE late = 'x'") == [(100,)]
    assert _count(path, "SELECT count(*) FROM aggregates") == [(50,)]


def test_schema_evolution_through_the_held_connection(tmp_path):
    path = tmp_path / "w.duckdb"
    wh = _wh(path)
    held = duckdb_store._held_for(str(path))
    wh.write_rows(_rows(0, 3))
    wh.write_rows(_rows(3, 3, {"color": "red"}))  # a new column while held: the cached schema follows
    wh.write_rows(_rows(6, 3, {"color": "blue", "size": "L"}))
    con = held.con
    assert con is not None
    assert [c.name for c in held.schemas["t"].columns][-2:] == ["color", "size"]
    release_held(str(path))
    # another writer (a connection per write, as the bounded job or another process) evolves it meanwhile
    _wh(path, keep_open=False).write_rows(_rows(9, 3, {"shape": "round"}))
    wh.write_rows(_rows(12, 3, {"shape": "square", "color": "green"}))  # re-reads the schema after the release
    rows = _count(path, "SELECT n, color, size, shape FROM t ORDER BY n")
    assert rows == [(i, None, None, None) for i in range(3)] + [(i, "red", None, None) for i in range(3, 6)] + \
        [(i, "blue", "L", None) for i in range(6, 9)] + [(i, None, None, "round") for i in range(9, 12)] + \
        [(i, "green", None, "square") for i in range(12, 15)]
    versions = _count(path, "SELECT version FROM _headwater_schemas WHERE table_name = 't' ORDER BY version")
    assert [v for (v,) in versions] == sorted({v for (v,) in versions}) and len(versions) == 4


def test_open_readonly_in_the_same_process_releases_the_writer(tmp_path):
    path = tmp_path / "w.duckdb"
    wh = _wh(path)
    wh.write_rows(_rows(0, 4))
    assert duckdb_store._held_for(str(path)).con is not None
    assert _count(path) == [(4,)]  # open_readonly: no "different configuration" error
    wh.write_rows(_rows(4, 4))
    assert _count(path) == [(8,)]


def test_held_and_per_write_store_the_same(tmp_path):
    a, b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    batches = [_rows(0, 20), _rows(20, 1, {"x": "1"}), _rows(10, 20), _rows(40, 5, {"y": "2"})]  # overlap: idempotent
    for keep, path in ((True, a), (False, b)):
        wh = _wh(path, keep_open=keep)
        for batch in batches:
            wh.write_rows(batch)
        wh.write_aggregates([AggregateRow("acme", "a", "u1", "lifetime", b'{"n":2}', 5, 2, 7, False)])
    release_held()
    q = "SELECT * EXCLUDE (_partition) FROM t ORDER BY _row_id"
    assert _count(a, q) == _count(b, q)
    assert len(_count(a, q)) == 35  # r0-r29 and r40-r44
    q = "SELECT * FROM aggregates"
    assert _count(a, q) == _count(b, q)
