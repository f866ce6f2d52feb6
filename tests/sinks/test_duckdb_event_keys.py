"""The DuckDB warehouse keeps one key per event (sinks/duckdb_store.py): main tables hold ``_row_id`` as PRIMARY
KEY, child tables as a plain column, and an event's rows are written in one transaction. Real DuckDB files; the
kill is a real SIGKILL of a subprocess in the middle of a write."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb
import orjson

from flatten.options import SchemaMode
from flatten.records import TableRow
from sinks import duckdb_sink, duckdb_store
from sinks.duckdb_store import DuckDBWarehouse
from sinks.spec import TableSpec, WarehouseSpec
from tests.sinks.test_duckdb_bounded_writer import _counts_in_other_process, _rows, _warehouse


def _keys(path) -> dict:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: con.execute("SELECT count(*) FROM duckdb_constraints() WHERE table_name = ? "
                               "AND constraint_type = 'PRIMARY KEY'", [t]).fetchone()[0] for t in ("t", "t__accounts")}
    finally:
        con.close()


def test_only_main_tables_hold_a_key(tmp_path):
    path = tmp_path / "w.duckdb"
    assert _warehouse(path).write_rows(_rows(10)) == []
    assert _keys(path) == {"t": 1, "t__accounts": 0}


def test_overlapping_and_repeated_writes_store_every_row_once(tmp_path, monkeypatch):
    monkeypatch.setattr(duckdb_store, "_IGNORE_FIRST", {})
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path)
    rows = _rows(60)
    assert wh.write_rows(rows[: 3 * 40]) == []  # events 0-39 (3 rows each)
    assert wh.write_rows(rows[3 * 20:]) == []  # events 20-59: 20 stored, 20 new
    for k in range(0, len(rows), 3 * 7):  # the whole input again in other batch sizes (whole events)
        assert wh.write_rows(rows[k:k + 3 * 7]) == []
    assert wh.write_rows(list(reversed(rows))) == []  # and in another order
    assert _counts_in_other_process(path) == {"t": (60, 60), "t__accounts": (120, 120)}


def test_a_kill_in_the_middle_of_a_write_leaves_an_events_rows_all_or_none(tmp_path):
    """The writer is killed (SIGKILL) after the main rows' statement ran and before the child rows' one: the
    transaction never committed, so the main rows are not there either; rewriting the input stores each row once."""
    path = tmp_path / "w.duckdb"
    assert _warehouse(path).write_rows(_rows(5)) == []  # committed before the kill
    code = textwrap.dedent(f"""
        import os, signal
        from sinks import duckdb_store
        from tests.sinks.test_duckdb_bounded_writer import _rows, _warehouse
        real = duckdb_store._Plan.run
        def run(self, con, mode, *a, **k):
            if not self.main:
                print("main rows inserted, killing", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, con, mode, *a, **k)
        duckdb_store._Plan.run = run
        _warehouse({str(path)!r}).write_rows(_rows(20, start=5))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, text=True)
    assert out.returncode == -9, out.stderr
    assert "main rows inserted, killing" in out.stdout
    assert _counts_in_other_process(path) == {"t": (5, 5), "t__accounts": (10, 10)}
    assert _warehouse(path).write_rows(_rows(25)) == []
    assert _counts_in_other_process(path) == {"t": (25, 25), "t__accounts": (50, 50)}


def _event(i: int, when: str) -> list:
    """A main row whose date the warehouse refuses (``when`` 2026-02-30) and two child rows."""
    main = TableRow("acme", "t", f"e{i}", f"e{i}", 1, orjson.dumps({"_event_time": "2026-11-01T00:00:00Z", "d": when}),
                    orjson.dumps({"_event_time": "TIMESTAMP", "d": "DATE"}))
    kids = [TableRow("acme", "t__accounts", f"e{i}-{k}", f"e{i}", 1,
                     orjson.dumps({"_row_id": f"e{i}-{k}", "_event_time": "2026-11-01T00:00:00Z", "n": k}),
                     orjson.dumps({"_row_id": "STRING", "_event_time": "TIMESTAMP", "n": "INT64"})) for k in range(2)]
    return [main, *kids]


def test_child_rows_of_a_refused_main_row_are_written_once(tmp_path):
    """The main row is dead-lettered (a date the column cannot hold); its child rows are not orphaned by it but
    stored where absent, so writing the event again neither loses nor doubles them."""
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path)
    for _ in range(2):
        dead = wh.write_rows(_event(1, "2026-11-01") + _event(2, "2026-02-30"))
        assert [(d.reason, d.coords) for d in dead] == [("sink_rejected", "table:t/e2")]
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT _row_id FROM t").fetchall() == [("e1",)]
        assert con.execute("SELECT _row_id FROM t__accounts ORDER BY 1").fetchall() == [
            ("e1-0",), ("e1-1",), ("e2-0",), ("e2-1",)]
    finally:
        con.close()


def test_a_warehouse_with_keyed_child_tables_from_before_still_writes_each_row_once(tmp_path, monkeypatch):
    """Child tables created with the old DDL (``_row_id`` PRIMARY KEY) keep it; writes into them, new, repeated
    and overlapping, still store each row once."""
    monkeypatch.setattr(duckdb_store, "_IGNORE_FIRST", {})
    path = tmp_path / "w.duckdb"
    with monkeypatch.context() as old:
        old.setattr(duckdb_store, "create_table_sql",
                    lambda table, keyed: f'CREATE TABLE IF NOT EXISTS "{table}" (_row_id VARCHAR PRIMARY KEY, '
                                         '_partition TIMESTAMP)')
        assert _warehouse(path).write_rows(_rows(10)) == []
    assert _keys(path) == {"t": 1, "t__accounts": 1}
    wh = _warehouse(path)
    assert wh.write_rows(_rows(20)) == []
    assert wh.write_rows(_rows(20, start=5)) == []
    assert wh.write_rows(_event(90, "2026-02-30")) != []
    assert wh.write_rows(_event(90, "2026-02-30")) != []
    assert _counts_in_other_process(path) == {"t": (25, 25), "t__accounts": (52, 52)}


def test_the_streaming_sink_writes_an_events_rows_together(tmp_path, monkeypatch):
    """Single rows (the streaming job's): a write never splits an event, whatever the flush size."""
    monkeypatch.setattr(duckdb_sink, "FLUSH_ROWS", 4)
    fn = duckdb_sink._BufferedWriteFn("rows", WarehouseSpec(kind="duckdb", path=str(tmp_path / "w.duckdb")),
                                      {"acme": TableSpec(name="t")}, {"acme": SchemaMode.EVOLVE})
    writes: list[list] = []
    real = DuckDBWarehouse.write_rows

    def spy(self, rows):
        writes.append(list(rows))
        return real(self, rows)

    monkeypatch.setattr(DuckDBWarehouse, "write_rows", spy)
    fn.setup()
    fn.start_bundle()
    for r in _rows(10):
        fn.process(r)
    fn.finish_bundle()
    fn.teardown()
    assert len(writes) > 1
    assert sum(len(w) for w in writes) == 30
    for w in writes:
        events = [r.event_id for r in w]
        assert all(events.count(e) == 3 for e in events), events  # every event of a write: all 3 of its rows
