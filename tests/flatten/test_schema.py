"""Schema evolution: new columns, widening, evolve / freeze / discard_value, versions."""
from flatten.core import Flattener
from flatten.options import FlattenOptions, SchemaMode
from flatten.schema import (ColumnSchema, Conflict, SchemaRegistry, TableSchema, conflict_message, reconcile,
                            variant_name)

E = SchemaMode.EVOLVE
F = SchemaMode.FREEZE
D = SchemaMode.DISCARD_VALUE

BASE = TableSchema((ColumnSchema("amount", "INT64", "NULLABLE"), ColumnSchema("tags", "STRING", "REPEATED")), 3)


def test_new_column_added_nullable_and_version_bumped():
    rec = reconcile(BASE, {"amount": 1, "note": "x", "ids": [1]}, {"amount": "INT64", "note": "STRING", "ids": "INT64[]"}, E)
    assert rec.changed and rec.schema.version == 4 and not rec.conflicts
    assert rec.schema.get("note") == ColumnSchema("note", "STRING", "NULLABLE")
    assert rec.schema.get("ids") == ColumnSchema("ids", "INT64", "REPEATED")
    assert BASE.get("note") is None  # immutable


def test_fast_path_unchanged():
    cols = {"amount": 5}
    rec = reconcile(BASE, cols, {"amount": "INT64"}, F)
    assert rec == (BASE, cols, [], False, [])


def test_evolve_moves_value_to_variant_column():
    rec = reconcile(BASE, {"amount": "abc"}, {"amount": "STRING"}, E)
    assert rec.columns == {"amount__v_string": "abc"}
    assert rec.schema.get("amount__v_string") == ColumnSchema("amount__v_string", "STRING", "NULLABLE")
    assert rec.conflicts == [] and rec.resolved == [Conflict("amount", "INT64", "STRING")]
    assert rec.changed and rec.schema.version == 4
    again = reconcile(rec.schema, {"amount": "def"}, {"amount": "STRING"}, E)
    assert not again.changed and again.columns == {"amount__v_string": "def"}
    arr = reconcile(BASE, {"amount": [1]}, {"amount": "INT64[]"}, E)
    assert arr.columns == {variant_name("amount", "INT64[]"): [1]} and "amount__v_int64_repeated" in arr.schema


def test_freeze_reports_conflict_and_leaves_schema_untouched():
    cols = {"amount": "abc", "new": 1}
    rec = reconcile(BASE, cols, {"amount": "STRING", "new": "INT64"}, F)
    assert rec.conflicts == [Conflict("amount", "INT64", "STRING")]
    assert rec.schema is BASE and not rec.changed and rec.columns == cols
    msg = conflict_message(rec.conflicts)
    assert "'amount'" in msg and "INT64" in msg and "STRING" in msg and "abc" not in msg


def test_discard_value_nulls_it_and_reports_resolved():
    rec = reconcile(BASE, {"amount": "abc"}, {"amount": "STRING"}, D)
    assert rec.columns == {"amount": None} and rec.conflicts == []
    assert rec.resolved == [Conflict("amount", "INT64", "STRING")] and not rec.changed


def test_safe_widening():
    s = TableSchema((ColumnSchema("f", "FLOAT64", "NULLABLE"), ColumnSchema("i", "INT64", "NULLABLE"),
                     ColumnSchema("s", "STRING", "NULLABLE"), ColumnSchema("t", "TIMESTAMP", "NULLABLE"),
                     ColumnSchema("j", "JSON", "NULLABLE"), ColumnSchema("n", "NUMERIC", "NULLABLE"),
                     ColumnSchema("fa", "FLOAT64", "REPEATED")))
    rec = reconcile(s, {"f": 2, "i": 3.0, "s": True, "t": "2026-01-02", "j": "x", "n": 7, "fa": [1, 2]},
                    {"f": "INT64", "i": "FLOAT64", "s": "BOOL", "t": "DATE", "j": "STRING", "n": "INT64",
                     "fa": "INT64[]"}, F)
    assert not rec.conflicts and not rec.changed
    assert rec.columns == {"f": 2.0, "i": 3, "s": "true", "t": "2026-01-02T00:00:00.000000Z", "j": '"x"', "n": "7",
                           "fa": [1.0, 2.0]}
    bad = reconcile(s, {"i": 3.5}, {"i": "FLOAT64"}, F)
    assert bad.conflicts == [Conflict("i", "INT64", "FLOAT64")]
    mode = reconcile(s, {"f": [1.0]}, {"f": "FLOAT64[]"}, F)
    assert mode.conflicts == [Conflict("f", "FLOAT64", "FLOAT64[]")]


def test_json_roundtrip_and_registry_history():
    assert TableSchema.from_json(BASE.to_json()) == BASE
    assert TableSchema.from_json(BASE.to_json().encode()).version == 3
    reg = SchemaRegistry()
    fl = Flattener(FlattenOptions())
    for doc in ({"a": 1}, {"a": 2}, {"a": 1, "b": "x"}, {"a": "oops"}):
        for row in fl.flatten(doc, event_id="e", user_id="u", event_time_us=0):
            reg.reconcile(row.table, row.columns, row.types, E)
    assert reg.get("").version == 3
    hist = reg.history("")
    assert len(hist) == 3 and [TableSchema.from_json(h).version for h in hist] == [1, 2, 3]
    assert "a__v_string" in reg.get("") and reg.tables() == ("",)
    assert '"a__v_string"' in reg.to_json()
