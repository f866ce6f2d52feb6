"""``duckdb_store.prepare_rows``: a write's grouping and Arrow columns built by the thread that makes the write
(the sink's bundle thread) store exactly what the plain list stores. Two real DuckDB files get the same writes,
one as plain lists and one prepared; every table, schema version and dead letter must be equal."""
from __future__ import annotations

import duckdb
import orjson
import pytest

from flatten.records import TableRow
from sinks import duckdb_store
from sinks.duckdb_store import PreparedRows, prepare_rows
from tests.sinks.test_duckdb_bounded_writer import _rows, _warehouse
from tests.sinks.test_duckdb_event_keys import _event


def _shaped(i: int, extra: bool) -> list:
    """An event whose main row has one more attribute when ``extra`` (a new column: the schema evolves)."""
    cols = {"_event_time": "2026-11-01T00:00:00Z", "amount": i * 0.5}
    types = {"_event_time": "TIMESTAMP", "amount": "FLOAT64"}
    if extra:
        cols["tier"], types["tier"] = f"t{i % 3}", "STRING"
    kid = TableRow("acme", "t__accounts", f"e{i}-0", f"e{i}", 1,
                   orjson.dumps({"_row_id": f"e{i}-0", "_event_time": "2026-11-01T00:00:00Z", "number": f"n{i}"}),
                   orjson.dumps({"_row_id": "STRING", "_event_time": "TIMESTAMP", "number": "STRING"}))
    return [TableRow("acme", "t", f"e{i}", f"e{i}", 1, orjson.dumps(cols), orjson.dumps(types)), kid]


def _writes() -> list:
    plain = _rows(40)
    dup = _rows(1, start=3)  # event 3 again in the same write: one row per row id
    shaped = [r for i in range(200, 230) for r in _shaped(i, extra=i % 4 == 1)]  # evolves mid-write
    return [
        plain,
        plain[: 3 * 10] + dup + _rows(20, start=40),  # 10 stored events again (careful), 20 new
        shaped,
        _event(300, "2026-11-01") + _event(301, "2026-02-30"),  # a refused main row and its child rows
        shaped[10:] + _rows(5, start=60),
        list(reversed(_rows(30, start=50))),
        _rows(10, start=100),  # new events of a stored shape: the common write
    ]


def _dump(path) -> dict:
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = [t for (t,) in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
        out = {}
        for t in tables:
            cols = [c for (c,) in con.execute(f"SELECT column_name FROM duckdb_columns() WHERE table_name = '{t}' "
                                              "ORDER BY column_index").fetchall()]
            skip = {"updated_at", "processing_time", "id"}  # wall-clock stamps and random dead-letter ids
            keep = [c for c in cols if c not in skip]
            sel = ", ".join(f'"{c}"' for c in keep)
            out[t] = (cols, sorted(map(repr, con.execute(f'SELECT {sel} FROM "{t}"').fetchall())))
        return out
    finally:
        con.close()


@pytest.mark.parametrize("held", [False, True])
def test_prepared_writes_store_what_plain_writes_store(tmp_path, held, monkeypatch):
    from sinks import duckdb_sink

    cls = duckdb_sink._HeldWarehouse if held else duckdb_store.DuckDBWarehouse
    a, b = tmp_path / "plain.duckdb", tmp_path / "prepared.duckdb"
    wa, wb = _warehouse(a, cls), _warehouse(b, cls)
    built = []
    real = duckdb_store._json_arrow
    monkeypatch.setattr(duckdb_store, "_json_arrow", lambda rows: built.append(len(rows)) or real(rows))
    for k, rows in enumerate(_writes()):
        dead_a = wa.write_rows(list(rows))
        prepared = prepare_rows(list(rows))
        assert isinstance(prepared, PreparedRows) and list(prepared) == rows
        before = len(built)
        dead_b = wb.write_rows(prepared)
        if k == len(_writes()) - 1:  # the common write: every statement uses what prepare_rows built
            assert len(built) == before, "the writer rebuilt the Arrow columns prepare_rows had built"
        assert [(d.reason, d.message, d.payload) for d in dead_a] == [(d.reason, d.message, d.payload) for d in dead_b]
        if dead_a:
            wa.write_dead_letters(dead_a)
            wb.write_dead_letters(dead_b)
    for wh in (wa, wb):
        if held:
            wh.release()
    da, db = _dump(a), _dump(b)
    assert da == db
    assert len(da["t"][1]) == 40 + 20 + 30 + 1 + 5 + 15 + 10  # every event once (event 301: main row refused)
    assert "tier" in da["t"][0]


def test_prepare_rows_groups_by_table_and_types_and_keeps_the_last_row_of_an_id():
    rows = _rows(3) + _rows(1, start=1)
    last = {r.row_id: r for r in rows}
    prepared = prepare_rows(rows)
    assert sorted(prepared.tables) == ["t", "t__accounts"]
    for table, (batch, groups) in prepared.tables.items():
        assert batch == [last[i] for i in dict.fromkeys(r.row_id for r in rows if r.table == table)]
        assert sum(len(g.rows) for g in groups.values()) == len(batch)
        for types, g in groups.items():
            assert all(r.types == types for r in g.rows)
            assert g.arrow.column("_row_id").to_pylist() == [r.row_id for r in g.rows]
            assert g.arrow.column("_doc").to_pylist() == [r.row.decode() for r in g.rows]
            assert g.events == {(r.partner, r.event_id) for r in g.rows}
