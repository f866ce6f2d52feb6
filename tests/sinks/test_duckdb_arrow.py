"""DuckDB writes through Arrow store exactly what the NDJSON path stored, for every column type."""
from __future__ import annotations

import duckdb
import orjson
import pytest

from flatten.fast import FastFlattener
from flatten.options import FlattenOptions, SchemaMode
from flatten.records import AggregateRow, DeadLetter, TableRow
from sinks import duckdb_store
from sinks.duckdb_store import DuckDBWarehouse
from sinks.spec import TableSpec, WarehouseSpec


def docs():
    yield {"i": 1, "f": 2.5, "b": True, "s": "text", "ts": "2026-11-01T10:00:00.123Z", "d": "2026-11-02",
           "big": 2**63 + 5, "neg": -(2**63), "arr": [1, 2, 3], "farr": [0.5, 1e300], "sarr": ["a", "b"],
           "tsarr": ["2026-11-01T00:00:00Z", "2026-01-01T23:59:59.999999Z"], "deep": {"a": {"b": {"c": {"d": 1}}}},
           "kids": [{"k": 1, "when": "2026-11-03T04:05:06Z"}, {"k": 2, "when": None}], "nul": None,
           "uni": "zoë 🎉 \u0000 nul", "mixed": [1, "x", None], "empty": [], "f_int_like": 3.0}
    yield {"i": 2, "f": -0.0001, "b": False, "s": "", "ts": "2026-11-01 10:00:00", "d": "1970-01-01",
           "arr": [], "sarr": [], "extra": {"x": [{"y": 1}]}, "i_as_float": 1.0}
    yield {"i": 3, "f": 1e-310, "s": "quote ' \" \\ backslash", "ts": "1999-12-31T23:59:59+00:00"}
    for k in range(12):  # same shapes again: these rows fit the schema and go as JSON text
        yield {"i": 10 + k, "f": k / 3, "b": k % 2 == 0, "s": f"s{k} é", "ts": f"2026-11-0{1 + k % 9}T10:00:0{k % 10}.5Z",
               "d": "2026-11-02", "arr": [k, -k], "sarr": ["x"] * (k % 3), "deep": {"a": {"b": {"c": {"d": k}}}},
               "kids": [{"k": k, "when": None}], "nul": None, "f_int_like": 2.0, "big": 2**63 + k, "neg": -(2**63)}


def rows(partner="acme", table="t"):
    ff = FastFlattener(FlattenOptions(max_depth=3, scalar_arrays="repeated"))
    out = []
    for n, doc in enumerate(docs()):
        for sub, row_id, cols, types in ff.rows(orjson.dumps(doc), f"e{n}", f"u{n}", 1_780_000_000_000_000 + n):
            out.append(TableRow(partner, table if not sub else f"{table}__{sub}", row_id, f"e{n}",
                                1_780_000_000_000_000 + n, cols, types))
    # types the flattener does not infer from JSON, written as BigQuery types directly
    out.append(TableRow(partner, table, "r-num", "e9", 1, orjson.dumps({"_event_time": "2026-11-01T00:00:00Z",
                        "n": "12345678901234567890.123456789", "bn": "1" * 60, "j": '{"a":[1,2]}'}),
                        orjson.dumps({"_event_time": "TIMESTAMP", "n": "NUMERIC", "bn": "BIGNUMERIC", "j": "JSON"})))
    out.append(TableRow(partner, "t__blob", "r-blob", "e9", 1, orjson.dumps({"by": "aGVsbG8="}),
                        orjson.dumps({"by": "BYTES"})))
    return out


def _refuse(*_a, **_k):
    raise duckdb.Error("JSON-text path disabled for the reference run")


def dump(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
        out = {}
        for t in tables:
            cols = con.execute(f'DESCRIBE "{t}"').fetchall()
            order = "_row_id" if any(c[0] == "_row_id" for c in cols) else "1"
            body = con.execute(f'SELECT * EXCLUDE (updated_at) FROM "{t}" ORDER BY {order}' if t == "_headwater_schemas"
                               else f'SELECT * FROM "{t}" ORDER BY ALL').fetchall()
            out[t] = ([(c[0], c[1]) for c in cols], body)
        return out
    finally:
        con.close()


def write(path, mode=SchemaMode.EVOLVE):
    wh = DuckDBWarehouse(WarehouseSpec(kind="duckdb", path=str(path)), {"acme": TableSpec(name="t")},
                         {"acme": mode})
    dead = wh.write_rows(rows())
    wh.write_dead_letters(dead + [DeadLetter("acme", "file", "file:x:1", b"\x00\xffraw", "sha256:00", "E",
                                             "malformed_json", "bad", "ParseEnvelope", None, 5)])
    wh.write_aggregates([AggregateRow("acme", "a", "k", "lifetime", b'{"n":1,"f":0.1}', 7, 8, 9, True),
                         AggregateRow("acme", "a", "k", "7d", b'{"n":null}', 7, 9, 9, False)])
    return dead


@pytest.mark.parametrize("mode", [SchemaMode.EVOLVE, SchemaMode.FREEZE])
def test_arrow_writes_equal_ndjson_writes(tmp_path, monkeypatch, mode):
    calls = []
    real = duckdb_store._arrow_insert

    def spy(*a, **k):
        ok = real(*a, **k)
        calls.append(ok)
        return ok

    json_rows = []
    real_json = duckdb_store._json_insert

    def json_spy(con, table, rows, *a, **k):
        real_json(con, table, rows, *a, **k)
        json_rows.extend(rows)

    monkeypatch.setattr(duckdb_store, "_arrow_insert", spy)
    monkeypatch.setattr(duckdb_store, "_json_insert", json_spy)
    dead_arrow = write(tmp_path / "arrow.duckdb", mode)
    assert len(json_rows) >= 5  # rows whose columns fit the schema went as JSON text through Arrow
    assert calls.count(True) >= 2  # dead letters and aggregates (and reconciled rows) as typed Arrow columns
    # the reference: every row as a dict through the NDJSON file, as before Arrow
    monkeypatch.setattr(duckdb_store, "_arrow_insert", lambda *a, **k: False)
    monkeypatch.setattr(duckdb_store, "_json_insert", _refuse)
    dead_json = write(tmp_path / "json.duckdb", mode)
    assert [d._replace(processing_time_us=0) for d in dead_arrow] == \
        [d._replace(processing_time_us=0) for d in dead_json]
    a, j = dump(tmp_path / "arrow.duckdb"), dump(tmp_path / "json.duckdb")
    assert a.keys() == j.keys()
    for t in a:
        assert a[t] == j[t], t
    assert len(a["t"][1]) == 16


def test_a_bad_value_falls_back_to_row_by_row_dead_letters(tmp_path):
    """A value the column cannot hold fails the Arrow statement like the NDJSON one: the row is found and
    dead-lettered, the others are written."""
    wh = DuckDBWarehouse(WarehouseSpec(kind="duckdb", path=str(tmp_path / "w.duckdb")), {"acme": TableSpec(name="t")},
                         {"acme": SchemaMode.EVOLVE})
    good = TableRow("acme", "t", "a", "e1", 1, orjson.dumps({"_event_time": "2026-11-01T00:00:00Z", "d": "2026-11-01"}),
                    orjson.dumps({"_event_time": "TIMESTAMP", "d": "DATE"}))
    bad = TableRow("acme", "t", "b", "e2", 1, orjson.dumps({"_event_time": "2026-11-01T00:00:00Z", "d": "2026-02-30"}),
                   orjson.dumps({"_event_time": "TIMESTAMP", "d": "DATE"}))
    dead = wh.write_rows([good, bad])
    assert [d.reason for d in dead] == ["sink_rejected"] and dead[0].coords == "table:t/b"
    con = duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True)
    assert con.execute("SELECT _row_id FROM t").fetchall() == [("a",)]
    con.close()
