"""The bounded job's DuckDB row writer (sinks.duckdb_sink: held connection within a bundle, child rows through
the JSON insert path) and the interpreter settings a bounded run uses (ingest.bounded.bounded_settings).
Real DuckDB files; "another process" is a real subprocess opening the file."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import orjson
import pytest

from flatten.fast import FastFlattener
from flatten.options import FlattenOptions
from flatten.records import TableRow
from flatten.options import SchemaMode
from ingest.bounded import bounded_settings
from sinks import duckdb_sink, duckdb_store
from sinks.duckdb_store import DuckDBWarehouse
from sinks.spec import TableSpec, WarehouseSpec

T0 = 1_764_547_200_000_000  # 2025-12-01T00:00:00Z


def _rows(n: int, start: int = 0) -> list:
    """n events with 2 child rows each (accounts[]), as the flattener makes them."""
    ff = FastFlattener(FlattenOptions())
    out = []
    for i in range(start, start + n):
        doc = orjson.dumps({"event": {"id": f"e{i}"}, "amount": i * 1.5, "accounts": [
            {"number": f"n{i}-{k}", "balance": k} for k in range(2)]})
        for sub, row_id, cols, types in ff.rows_python(doc, f"e{i}", f"u{i % 7}", T0 + i):
            out.append(TableRow("acme", "t" if not sub else f"t__{sub}", row_id, f"e{i}", T0 + i, cols, types))
    return out


def _warehouse(path, cls=DuckDBWarehouse, **kw):
    return cls(WarehouseSpec(kind="duckdb", path=str(path)), {"acme": TableSpec(name="t")},
               {"acme": SchemaMode.EVOLVE}, **kw)


def _counts_in_other_process(path) -> dict:
    """Row counts read by a separate process: it can only open the file once no writer holds it."""
    code = textwrap.dedent(f"""
        import json, duckdb
        con = duckdb.connect({str(path)!r}, read_only=True)
        print(json.dumps({{t: con.execute(f'SELECT count(*), count(DISTINCT _row_id) FROM "{{t}}"').fetchone()
                           for t in ("t", "t__accounts")}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=True)
    return {k: tuple(v) for k, v in orjson.loads(out.stdout.splitlines()[-1]).items()}


def test_held_writer_keeps_one_connection_and_frees_the_file_on_release(tmp_path):
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path, duckdb_sink._HeldWarehouse, hold_s=3600)
    assert wh.write_rows(_rows(50)) == []
    con = wh._con
    assert con is not None
    assert wh.write_rows(_rows(50, start=50)) == []
    assert wh.write_rows(_rows(10, start=95)) == []  # 5 repeated events: ignored by row id
    assert wh._con is con  # no reconnect (and no checkpoint) between writes
    wh.release()
    assert wh._con is None
    assert _counts_in_other_process(path) == {"t": (105, 105), "t__accounts": (210, 210)}


def test_held_writer_reconnects_after_hold_s(tmp_path):
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path, duckdb_sink._HeldWarehouse, hold_s=0.0)
    wh.write_rows(_rows(5))
    first = wh._con
    wh.write_rows(_rows(5, start=5))
    assert wh._con is not first  # held for at most hold_s: closed (checkpointed) and reopened
    wh.release()
    assert _counts_in_other_process(path) == {"t": (10, 10), "t__accounts": (20, 20)}


def test_child_rows_take_the_json_insert_path(tmp_path, monkeypatch):
    """A child row's columns include its _row_id: it must not push the whole table to the per-row dict path."""
    calls = []
    real = duckdb_store._Plan.run

    def spy(self, con, mode, *a, **k):
        if self.recs is not None:
            calls.append((self.table, len(self.recs)))
        return real(self, con, mode, *a, **k)

    monkeypatch.setattr(duckdb_store._Plan, "run", spy)
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path)
    rows = _rows(40)
    assert orjson.loads(rows[1].row)["_row_id"] == rows[1].row_id  # the case under test: a child row
    wh.write_rows(rows)
    wh.write_rows(_rows(40, start=40))
    # only the first row of each new table (it adds the columns) goes through the dict path
    assert sorted(calls) == [("t", 1), ("t__accounts", 1)]
    con = duckdb_store.open_readonly(str(path))
    try:
        got = con.execute('SELECT _row_id, number, balance FROM "t__accounts" ORDER BY _row_id').fetchall()
    finally:
        con.close()
    want = sorted((r.row_id, orjson.loads(r.row)["number"], orjson.loads(r.row)["balance"])
                  for r in rows + _rows(40, start=40) if r.table == "t__accounts")
    assert got == want


def test_bundle_lifecycle_waits_for_rows_and_releases_the_file(tmp_path):
    path = tmp_path / "w.duckdb"
    fn = duckdb_sink._BufferedWriteFn("rows", WarehouseSpec(kind="duckdb", path=str(path)),
                                      {"acme": TableSpec(name="t")}, {"acme": SchemaMode.EVOLVE}, hold=True)
    fn.setup()
    assert fn._flush_rows == duckdb_sink.HELD_FLUSH_ROWS
    fn.start_bundle()
    for k in range(0, 300, 30):
        fn.process(_rows(30, start=k))
    fn.finish_bundle()  # rows committed; the held connection closes in the writer thread
    fn.start_bundle()  # a second bundle reconnects after that close
    fn.process(_rows(10, start=300))
    fn.finish_bundle()
    fn.teardown()  # waits for the last close
    assert fn._wh._con is None
    assert _counts_in_other_process(path) == {"t": (310, 310), "t__accounts": (620, 620)}


def test_a_bundle_keeps_two_writes_in_flight_and_ends_only_when_all_are_stored(tmp_path, monkeypatch):
    """HELD_IN_FLIGHT: the bundle goes on while two writes are queued or running, waits for the oldest before a
    third, and finish_bundle waits for every one; each write gets its rows prepared (PreparedRows)."""
    import threading

    path = tmp_path / "w.duckdb"
    monkeypatch.setattr(duckdb_sink, "HELD_FLUSH_ROWS", 30)
    fn = duckdb_sink._BufferedWriteFn("rows", WarehouseSpec(kind="duckdb", path=str(path)),
                                      {"acme": TableSpec(name="t")}, {"acme": SchemaMode.EVOLVE}, hold=True)
    fn.setup()
    gate, started, done, kinds = threading.Event(), [], [], []
    real = fn._wh.write_rows

    def write_rows(rows):
        started.append(len(rows))
        kinds.append(type(rows).__name__)
        assert gate.wait(30)
        out = real(rows)
        done.append(len(rows))
        return out

    fn._wh.write_rows = write_rows
    fn.start_bundle()
    fn.process(_rows(10))  # 30 rows: one write
    fn.process(_rows(10, start=10))  # a second: both in flight, the bundle has not waited
    assert len(fn._pending) == 2 and not done
    waiter = threading.Thread(target=fn.process, args=(_rows(10, start=20),))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "a third write must wait for the oldest"
    gate.set()
    waiter.join(30)
    fn.finish_bundle()
    assert not fn._pending and sorted(done) == [30, 30, 30] and set(kinds) == {"PreparedRows"}
    fn.teardown()
    assert _counts_in_other_process(path) == {"t": (30, 30), "t__accounts": (60, 60)}


def test_bounded_settings_are_restored():
    before_gc, before_si = gc.get_threshold(), sys.getswitchinterval()
    with pytest.raises(RuntimeError):
        with bounded_settings(thresholds=(123_456, 30, 200), switch_s=0.0007):
            assert gc.get_threshold() == (max(123_456, before_gc[0]), max(30, before_gc[1]), max(200, before_gc[2]))
            assert sys.getswitchinterval() == pytest.approx(min(0.0007, before_si))
            raise RuntimeError("the job failed")
    assert gc.get_threshold() == before_gc
    assert sys.getswitchinterval() == before_si


def test_plain_insert_first_then_careful_after_a_stored_row_id(tmp_path, monkeypatch):
    """A write first runs plain INSERTs (cheaper); one that meets a stored main row id is rolled back as a whole
    and runs again careful (main rows INSERT OR IGNORE ... RETURNING, child rows only of the events stored now):
    the stored rows are exactly the distinct ones, and the table's next writes start careful for the back-off."""
    monkeypatch.setattr(duckdb_store, "_IGNORE_FIRST", {})
    seen: list[str] = []
    real = duckdb_store._run_insert

    def spy(con, table, cols, select, mode, returned, target):
        seen.append(f"{table}:{mode}")
        return real(con, table, cols, select, mode, returned, target)

    monkeypatch.setattr(duckdb_store, "_run_insert", spy)
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path)
    assert wh.write_rows(_rows(40)) == []
    # (a new table's first row adds its columns: two plain statements per table in this first write)
    assert list(dict.fromkeys(seen)) == ["t:plain", "t__accounts:plain"]
    assert duckdb_store._IGNORE_FIRST == {}  # no stored id met: no back-off
    assert _counts_in_other_process(path) == {"t": (40, 40), "t__accounts": (80, 80)}
    # 20 stored + 20 new events: the plain INSERT fails, the transaction rolls back, the careful one writes the new
    seen.clear()
    assert wh.write_rows(_rows(40, start=20)) == []
    assert seen == ["t:plain", "t:returning", "t__accounts:plain"]
    assert _counts_in_other_process(path) == {"t": (60, 60), "t__accounts": (120, 120)}
    assert duckdb_store._IGNORE_FIRST == {"t": [duckdb_store._BACKOFF_START] * 2}  # main tables only
    # while backing off, writes are careful from the start (a re-run meets stored ids each time)
    seen.clear()
    assert wh.write_rows(_rows(60)) == []
    assert seen == ["t:returning"]  # every event stored already: no child statement at all
    assert _counts_in_other_process(path) == {"t": (60, 60), "t__accounts": (120, 120)}


def test_backoff_doubles_on_repeated_conflicts_and_resets_after_a_clean_insert(tmp_path, monkeypatch):
    monkeypatch.setattr(duckdb_store, "_IGNORE_FIRST", {})
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path)
    assert wh.write_rows(_rows(10)) == []
    assert wh.write_rows(_rows(10)) == []  # a re-run: the plain INSERT meets stored ids
    start = duckdb_store._BACKOFF_START
    assert duckdb_store._IGNORE_FIRST["t"] == [start, start]
    for _ in range(start):  # the back-off: careful from the start
        assert wh.write_rows(_rows(10)) == []
    assert duckdb_store._IGNORE_FIRST["t"] == [0, start]
    assert wh.write_rows(_rows(10)) == []  # plain first again, conflicts again: twice as long
    assert duckdb_store._IGNORE_FIRST["t"] == [2 * start, 2 * start]
    duckdb_store._IGNORE_FIRST["t"][0] = 0
    assert wh.write_rows(_rows(10, start=10)) == []  # new ids only: the plain INSERT succeeds, back-off over
    assert duckdb_store._IGNORE_FIRST == {}
    assert _counts_in_other_process(path) == {"t": (20, 20), "t__accounts": (40, 40)}


def test_a_bad_value_beside_a_stored_row_id_is_dead_lettered_once_and_nothing_doubles(tmp_path, monkeypatch):
    """A value the column cannot hold is not a key conflict: with plain INSERT first, a statement holding both a
    stored row id and a bad value ends as before: the bad row dead-lettered, the stored row not doubled, the
    new row written."""
    monkeypatch.setattr(duckdb_store, "_IGNORE_FIRST", {})
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path)
    types = orjson.dumps({"_event_time": "TIMESTAMP", "d": "DATE"})

    def row(rid, d):
        return TableRow("acme", "t", rid, "e" + rid, 1, orjson.dumps({"_event_time": "2026-11-01T00:00:00Z", "d": d}),
                        types)

    assert wh.write_rows([row("a", "2026-11-01")]) == []
    dead = wh.write_rows([row("a", "2026-11-01"), row("b", "2026-02-30"), row("c", "2026-11-02")])
    assert [(d.reason, d.coords) for d in dead] == [("sink_rejected", "table:t/b")]
    import duckdb
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT _row_id, d::VARCHAR FROM t ORDER BY 1").fetchall() == [
            ("a", "2026-11-01"), ("c", "2026-11-02")]
    finally:
        con.close()


def test_held_writer_holds_longer_when_closing_is_slow(tmp_path):
    """The hold grows to HOLD_CLOSE_RATIO x the last close's time (a checkpoint's cost grows with the table),
    capped at HOLD_MAX_S; the measured close time is real (the file's checkpoint)."""
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path, duckdb_sink._HeldWarehouse, hold_s=0.0)
    wh.write_rows(_rows(5))
    first = wh._con
    wh.write_rows(_rows(5, start=5))
    assert wh._con is not first  # hold_s 0 and a fast close: reopened
    assert 0.0 < wh._last_close_s < 5.0  # measured on the real close
    wh._last_close_s = 2.0  # as if the file's checkpoint took 2 s
    assert wh.hold_for() == 2.0 * duckdb_sink.HOLD_CLOSE_RATIO
    second = wh._con
    wh.write_rows(_rows(5, start=10))
    assert wh._con is second  # within 10 x 2 s of its opening: kept
    wh._last_close_s = 1e6
    assert wh.hold_for() == duckdb_sink.HOLD_MAX_S  # never longer than another writer's lock wait allows
    wh._last_close_s = 0.0
    wh.write_rows(_rows(5, start=15))
    assert wh._con is not second
    wh.release()
    assert _counts_in_other_process(path) == {"t": (20, 20), "t__accounts": (40, 40)}


def test_held_writer_checkpoints_at_its_own_wal_threshold(tmp_path):
    """The bounded writer's connection lets the write-ahead log grow to CHECKPOINT_THRESHOLD before a commit
    checkpoints (DuckDB's default is 16 MB); what it wrote is all there after the release."""
    path = tmp_path / "w.duckdb"
    wh = _warehouse(path, duckdb_sink._HeldWarehouse, hold_s=3600)
    assert wh.write_rows(_rows(20)) == []
    got = wh._con.execute("SELECT current_setting('checkpoint_threshold')").fetchone()[0]
    assert duckdb_sink.CHECKPOINT_THRESHOLD == "64MB" and got == "61.0 MiB", got  # DuckDB shows 64 MB in MiB
    wh.release()
    assert _counts_in_other_process(path) == {"t": (20, 20), "t__accounts": (40, 40)}


def _evolving_rows(i: int, extra: str) -> list:
    """One event whose main row has a column ``extra`` (a new attribute: the schema evolves)."""
    ff = FastFlattener(FlattenOptions())
    doc = orjson.dumps({"event": {"id": f"x{i}"}, extra: i})
    return [TableRow("acme", "t" if not sub else f"t__{sub}", row_id, f"x{i}", T0 + i, cols, types)
            for sub, row_id, cols, types in ff.rows_python(doc, f"x{i}", "u", T0 + i)]


def test_held_writer_reads_a_tables_schema_once_per_connection(tmp_path, monkeypatch):
    loads = []
    real = DuckDBWarehouse._load_schema
    monkeypatch.setattr(DuckDBWarehouse, "_load_schema",
                        staticmethod(lambda con, table: loads.append(table) or real(con, table)))
    wh = _warehouse(tmp_path / "w.duckdb", duckdb_sink._HeldWarehouse, hold_s=3600)
    for k in range(5):
        assert wh.write_rows(_rows(20, start=20 * k)) == []
    # once per table while the connection is open (the first write creates both tables: nothing to load then)
    assert sorted(loads) == ["t", "t__accounts"]
    wh.release()
    wh.write_rows(_rows(20, start=100))
    assert sorted(loads) == ["t", "t", "t__accounts", "t__accounts"]  # a new connection reads them again
    wh.release()
    assert _counts_in_other_process(tmp_path / "w.duckdb") == {"t": (120, 120), "t__accounts": (240, 240)}


def test_two_held_writers_in_one_process_see_each_others_schema_changes(tmp_path):
    """Two writers of one file in one process (two instances of the sink's DoFn) both cache schemas: a column one
    of them adds must not be added again, nor lost, by the other."""
    path = tmp_path / "w.duckdb"
    a = _warehouse(path, duckdb_sink._HeldWarehouse, hold_s=3600)
    b = _warehouse(path, duckdb_sink._HeldWarehouse, hold_s=3600)
    assert a.write_rows(_rows(3)) == [] and b.write_rows(_rows(3, start=3)) == []  # both cached the schema
    assert a.write_rows(_evolving_rows(1, "new_a")) == []  # a adds new_a
    assert b.write_rows(_evolving_rows(2, "new_b")) == []  # b must add new_b to the schema that has new_a
    assert a.write_rows(_evolving_rows(3, "new_a") + _evolving_rows(4, "new_b")) == []
    a.release()
    b.release()
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        cols = {r[0] for r in con.execute("DESCRIBE t").fetchall()}
        assert {"new_a", "new_b"} <= cols
        assert con.execute("SELECT count(*), count(new_a), count(new_b) FROM t").fetchone() == (10, 2, 2)
        latest = con.execute("SELECT schema_json FROM _headwater_schemas WHERE table_name = 't' "
                             "ORDER BY version DESC LIMIT 1").fetchone()[0]
        assert {"new_a", "new_b"} <= {c["name"] for c in orjson.loads(latest)["columns"]}
    finally:
        con.close()


def test_only_writes_of_a_row_group_or_more_are_sorted_by_partition(tmp_path, monkeypatch):
    """Sorting a write by ``_partition`` only narrows DuckDB's zone maps when the write fills a row group; smaller
    writes are inserted as they come (the sort was a third of the insert's CPU)."""
    selects = []
    real = duckdb_store._run_insert

    def spy(con, table, cols, select, *a):
        selects.append((table, "ORDER BY" in select))
        return real(con, table, cols, select, *a)

    monkeypatch.setattr(duckdb_store, "_run_insert", spy)
    wh = _warehouse(tmp_path / "w.duckdb")
    wh.write_rows(_rows(40))
    assert selects and not any(sorted_ for _, sorted_ in selects)
    selects.clear()
    monkeypatch.setattr(duckdb_store, "ROW_GROUP_ROWS", 60)  # 60 main rows, 120 child rows
    wh.write_rows(_rows(60, start=40))
    assert sorted(selects) == [("t", True), ("t__accounts", True)]
    assert _counts_in_other_process(tmp_path / "w.duckdb") == {"t": (100, 100), "t__accounts": (200, 200)}


def test_a_large_sorted_write_gives_row_groups_narrow_partition_ranges(tmp_path):
    """What the sort is kept for: one write of two row groups of rows from two days in random order becomes row
    groups whose zone maps hold one day each (so ``WHERE _partition = ...`` skips the other)."""
    import duckdb

    n = 2 * duckdb_store.ROW_GROUP_ROWS
    day = 86_400_000_000
    ff = FastFlattener(FlattenOptions())
    rows = []
    for i in range(n):
        t = T0 + (i % 2) * day + i  # alternating days
        for sub, row_id, cols, types in ff.rows_python(orjson.dumps({"v": i}), f"e{i}", "u", t):
            rows.append(TableRow("acme", "t", row_id, f"e{i}", t, cols, types))
    wh = _warehouse(tmp_path / "w.duckdb")
    assert wh.write_rows(rows[:1]) == []  # creates the table (its first row: day one), so the rest is one statement
    assert wh.write_rows(rows[1:]) == []
    con = duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True)
    try:
        stats = con.execute("SELECT row_group_id, min(stats), max(stats) FROM pragma_storage_info('t') "
                            "WHERE column_name = '_partition' AND segment_type <> 'VALIDITY' GROUP BY 1").fetchall()
    finally:
        con.close()
    assert len(stats) >= 2
    first, last = stats[0][1], stats[-1][2]
    assert "2025-12-01" in first and "2025-12-02" not in first  # the first row group: the first day only
    assert "2025-12-02" in last
