"""Flattener rules: columns, arrays, depth, types, envelope, child ids, compiled plans."""
import copy

import orjson
import pytest

from flatten.core import FlatRow, FlattenError, Flattener, child_row_id
from flatten.options import FlattenOptions

ET = 1_767_323_045_123_456  # 2026-01-02T03:04:05.123456Z


def flat(doc, **opts):
    return Flattener(FlattenOptions(**opts)).flatten(doc, event_id="e1", user_id="u1", event_time_us=ET)


def main(doc, **opts):
    return flat(doc, **opts)[0]


def test_envelope_and_nested_objects():
    r = main({"a": 1, "b": {"c": "x", "d": {"e": True}}})
    assert r.table == "" and r.row_id == "e1"
    assert r.columns == {"_event_id": "e1", "_user_id": "u1", "_event_time": "2026-01-02T03:04:05.123456Z",
                         "a": 1, "b__c": "x", "b__d__e": True}
    assert r.types == {"_event_id": "STRING", "_user_id": "STRING", "_event_time": "TIMESTAMP",
                       "a": "INT64", "b__c": "STRING", "b__d__e": "BOOL"}


def test_user_keys_cannot_shadow_envelope_columns():
    r = main({"_event_id": "evil", "_user_id": "x", "_row_id": 1, "_PARTITIONTIME": 3})
    assert r.columns["_event_id"] == "e1" and r.columns["_user_id"] == "u1"
    assert r.columns["event_id"] == "evil" and r.columns["row_id"] == 1 and r.columns["partitiontime"] == 3
    assert not any(c.startswith("_") for c in r.columns if c not in ("_event_id", "_user_id", "_event_time"))


def test_nulls_empty_objects_and_arrays_produce_no_columns():
    r = main({"n": None, "o": {}, "a": [], "z": [None, None]})
    assert set(r.columns) == {"_event_id", "_user_id", "_event_time"}


def test_scalar_types():
    r = main({"i": 5, "f": 1.5, "b": False, "s": "abc", "big": 2**63, "huge": 10**40, "neg": -(2**63)})
    assert r.types["i"] == "INT64" and r.types["f"] == "FLOAT64" and r.types["b"] == "BOOL"
    assert r.types["s"] == "STRING" and r.types["neg"] == "INT64"
    assert (r.columns["big"], r.types["big"]) == (str(2**63), "NUMERIC")
    assert (r.columns["huge"], r.types["huge"]) == (str(10**40), "STRING")


@pytest.mark.parametrize("value,expected", [
    ("2026-01-02T03:04:05Z", ("2026-01-02T03:04:05.000000Z", "TIMESTAMP")),
    ("2026-01-02T03:04:05.5+02:00", ("2026-01-02T01:04:05.500000Z", "TIMESTAMP")),
    ("2026-01-02 03:04:05", ("2026-01-02T03:04:05.000000Z", "TIMESTAMP")),
    ("2026-01-02", ("2026-01-02", "DATE")),
    ("2026-13-02", ("2026-13-02", "STRING")),
    ("2026-01-02Tnope", ("2026-01-02Tnope", "STRING")),
    ("hello-world", ("hello-world", "STRING")),
])
def test_timestamp_detection(value, expected):
    r = main({"t": value})
    assert (r.columns["t"], r.types["t"]) == expected


def test_timestamp_detection_configurable_per_column():
    doc = {"t": "2026-01-02", "code": "2026-01-02T00:00:00Z", "epoch": 1767323045, "ms": 1767323045123, "bad": "x"}
    r = main(doc, timestamp_columns=("t", "epoch", "ms", "bad"), no_timestamp_columns=("code",))
    assert (r.columns["t"], r.types["t"]) == ("2026-01-02T00:00:00.000000Z", "TIMESTAMP")
    assert (r.columns["code"], r.types["code"]) == ("2026-01-02T00:00:00Z", "STRING")
    assert r.columns["epoch"] == "2026-01-02T03:04:05.000000Z" and r.types["epoch"] == "TIMESTAMP"
    assert r.columns["ms"] == "2026-01-02T03:04:05.123000Z"
    assert r.types["bad"] == "STRING"  # not a timestamp: its own type; reconcile decides
    off = main({"t": "2026-01-02T03:04:05Z"}, detect_timestamps=False)
    assert off.types["t"] == "STRING"


def test_array_of_objects_becomes_child_table():
    rows = flat({"items": [{"sku": "a", "offers": [{"p": 1}, {"p": 2}]}, None, {"sku": "b"}]})
    assert [r.table for r in rows] == ["", "items", "items__offers", "items__offers", "items"]
    item0, off0, off1, item2 = rows[1:]
    assert item0.columns["_index"] == 0 and item2.columns["_index"] == 2  # original positions
    assert item0.columns["_parent_row_id"] == "e1" and item0.columns["_event_id"] == "e1"
    assert off0.columns["_parent_row_id"] == item0.row_id and off1.columns["_index"] == 1
    assert item0.row_id == child_row_id("e1", "e1", "items", 0) == item0.columns["_row_id"]
    assert off1.row_id == child_row_id("e1", item0.row_id, "items__offers", 1)
    assert len({r.row_id for r in rows}) == 5
    assert item0.types["_index"] == "INT64" and item0.types["_event_time"] == "TIMESTAMP"
    assert "items" not in rows[0].columns


def test_child_ids_do_not_depend_on_other_events_or_wall_clock():
    a = flat({"items": [{"x": 1}]})
    b = Flattener(FlattenOptions()).flatten({"items": [{"x": 2}], "other": 1}, event_id="e1", user_id="zz",
                                           event_time_us=0)
    assert a[1].row_id == b[1].row_id
    assert a[1].row_id == "c" * 0 + child_row_id("e1", "e1", "items", 0)
    assert len(a[1].row_id) == 32


def test_scalar_arrays_repeated():
    r = main({"tags": ["a", None, "b"], "n": [1, 2], "f": [1, 2.5], "b": [True], "ts": ["2026-01-02T00:00:00Z"],
              "big": [1, 2**64]})
    assert (r.columns["tags"], r.types["tags"]) == (["a", "b"], "STRING[]")
    assert (r.columns["n"], r.types["n"]) == ([1, 2], "INT64[]")
    assert (r.columns["f"], r.types["f"]) == ([1.0, 2.5], "FLOAT64[]")
    assert r.types["b"] == "BOOL[]" and r.types["ts"] == "TIMESTAMP[]"
    assert (r.columns["big"], r.types["big"]) == (["1", str(2**64)], "NUMERIC[]")


def test_scalar_arrays_as_child_rows():
    rows = flat({"tags": ["a", None, "b"]}, scalar_arrays="child")
    assert [(r.table, r.columns["_index"], r.columns["value"]) for r in rows[1:]] == [("tags", 0, "a"), ("tags", 2, "b")]
    assert "tags" not in rows[0].columns


def test_mixed_arrays_and_arrays_of_arrays_are_json():
    r = main({"m": [1, "a"], "o": [{"a": 1}, 2], "aa": [[1, 2], [3]], "bn": [True, 1]})
    assert (r.columns["m"], r.types["m"]) == ('[1,"a"]', "JSON")
    assert r.types["o"] == "JSON" and r.types["aa"] == "JSON" and r.types["bn"] == "JSON"
    assert orjson.loads(r.columns["aa"]) == [[1, 2], [3]]


def test_max_depth_keeps_rest_as_json():
    doc = {"a": {"b": {"c": {"d": 1}}}, "l": [{"x": {"y": 1}}], "top": 1}
    r = flat(doc, max_depth=2)
    assert r[0].columns["a__b"] == '{"c":{"d":1}}' and r[0].types["a__b"] == "JSON"
    assert r[1].table == "l" and r[1].columns["x"] == '{"y":1}' and r[1].types["x"] == "JSON"
    r1 = main(doc, max_depth=1)
    assert r1.types["a"] == "JSON" and r1.types["l"] == "JSON" and r1.columns["top"] == 1
    deep = main(doc, max_depth=16)
    assert deep.columns["a__b__c__d"] == 1


def test_collisions_in_one_object():
    r = main({"User Name": 1, "user_name": 2, "A": {"x": 1}, "a": {"x": 2}})
    assert r.columns["user_name"] == 2
    other = [c for c in r.columns if c.startswith("user_name_")]
    assert len(other) == 1 and r.columns[other[0]] == 1
    assert r.columns["a__x"] == 2 and sum(1 for c in r.columns if c.endswith("__x")) == 2


def test_deterministic_and_input_not_mutated():
    doc = {"b": {"c": [1, 2]}, "items": [{"a": "2026-01-02"}], "x": None}
    before = copy.deepcopy(doc)
    assert flat(doc) == flat(doc)
    assert doc == before


def test_compiled_plans_match_generic_walk():
    docs = [{"a": i, "s": "2026-01-0%dT00:00:00Z" % (1 + i % 9), "o": {"p": i * 1.5, "q": None if i % 2 else "x"},
             "items": [{"k": i}, {"k": str(i)}], "t": ["a"] if i % 3 else [], "w": [1, "x"] if i % 4 == 0 else None}
            for i in range(30)]
    fast, slow = Flattener(FlattenOptions()), Flattener(FlattenOptions())
    slow.compile_enabled = False
    for d in docs:
        a = fast.flatten(d, event_id="e", user_id="u", event_time_us=0)
        b = slow.flatten(d, event_id="e", user_id="u", event_time_us=0)
        assert a == b
        assert [list(r.columns) for r in a] == [list(r.columns) for r in b]
        assert [list(r.types) for r in a] == [list(r.types) for r in b]
    assert fast._nplans > 0


def test_many_shapes_fall_back_to_generic():
    f = Flattener(FlattenOptions())
    for i in range(200):
        doc = {"m": {f"id{i}": i, f"id{i+1}": i}}
        rows = f.flatten(doc, event_id="e", user_id="u", event_time_us=0)
        rows2 = f.flatten(doc, event_id="e", user_id="u", event_time_us=0)
        assert rows == rows2 and rows[0].columns[f"m__id{i}"] == i
    assert f._root.subs["m"].generic


def test_errors_are_flatten_errors_without_values():
    with pytest.raises(FlattenError) as ei:
        main({"a": {1, 2}})
    assert ei.value.reason == "unsupported_type" and "'a'" in str(ei.value)
    with pytest.raises(FlattenError) as ei:
        Flattener(FlattenOptions()).flatten({}, event_id="e", user_id="u", event_time_us=10**20)
    assert ei.value.reason == "bad_event_time"
    deep: object = 1
    for _ in range(3000):
        deep = {"k": deep}
    with pytest.raises(FlattenError) as ei:
        main({"secret": deep}, max_depth=1)
    assert ei.value.reason == "unencodable"
    wide = {f"k{i}": i for i in range(10_001)}
    with pytest.raises(FlattenError) as ei:
        main(wide)
    assert ei.value.reason == "too_many_columns"


def test_flatrow_values_are_json_safe():
    rows = flat({"a": {"b": [1, 2]}, "c": [{"d": 2**64 - 1}], "e": [[1]], "f": 1.5})
    for r in rows:
        assert isinstance(r, FlatRow)
        orjson.dumps(r.columns)
        orjson.dumps(r.types)
