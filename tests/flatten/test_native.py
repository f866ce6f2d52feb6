"""Differential tests: the compiled accelerator (native/, ``headwater_native``) against the Python reference.

Guarantee checked here: for every input, the native path returns *byte-identical*
``orjson.dumps(columns)`` / ``orjson.dumps(types)`` bytes, tables and row ids to
the Python path (``FastFlattener.rows_python``), or declines (None) — and it
declines only where documented (flatten/fast.py): when the Python path raises,
or for negative zero / nesting deeper than 128 levels.

These tests FAIL when the module is not built (``./hw`` builds it); set
``HEADWATER_NO_NATIVE=1`` to skip them explicitly on a machine without Rust.
"""
import json
import math
import os
import random
import re
import struct
import sys

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatten import fast
from flatten.core import Flattener
from flatten.infer import epoch_to_timestamp, parse_timestamp
from flatten.mask import DEV_KEY
from flatten.options import ColumnAnnotation, FlattenOptions
from tests.flatten.test_properties import TRICKY_KEYS, deep_values, json_values, keys, large_arrays

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from flatten_bench import ANNOTATIONS, reference_event  # noqa: E402

if os.environ.get("HEADWATER_NO_NATIVE") == "1":
    pytest.skip("HEADWATER_NO_NATIVE=1: native accelerator disabled explicitly", allow_module_level=True)

SETTINGS = settings(max_examples=int(os.environ.get("HEADWATER_NATIVE_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ET = 1_767_323_045_123_456


def test_native_module_is_built():
    assert fast.native_available(), (
        f"headwater_native is not importable ({fast.native_import_error()}): run ./hw (installs native/) "
        "or `pip install ./native`; HEADWATER_NO_NATIVE=1 skips these tests")


native = fast._native  # None when not built: every test below then fails too


# ------------------------------------------------------------------ helpers

def _big_int(payload: bytes) -> bool:
    """An integer beyond i64/u64 in the payload: the native parser declines (Python keeps it exact, flatten.jsonio)."""
    from flatten import jsonio

    stack = [jsonio.loads(payload)]
    while stack:
        x = stack.pop()
        if type(x) is int and not -(2**63) <= x < 2**64:
            return True
        stack.extend(x.values() if type(x) is dict else x if type(x) is list else ())
    return False


NEG_ZERO = re.compile(rb"-0(\.0*)?([eE][-+]?[0-9]+)?(?![0-9.eE])")


def _neg_zero_or_deep(v, depth=0):
    if depth > 120:
        return True
    if type(v) is float:
        return v == 0.0 and str(v).startswith("-")
    if type(v) is dict:
        return any(_neg_zero_or_deep(x, depth + 1) for x in v.values())
    if type(v) is list:
        return any(_neg_zero_or_deep(x, depth + 1) for x in v)
    return False


def check(ff, payload: bytes, mask: bool, event_id="evt-1", user_id="user-1", et=ET):
    """Native vs Python on one payload; returns the native rows (None if declined)."""
    try:
        want = ff.rows_python(payload, event_id, user_id, et, mask=mask)
        err = None
    except Exception as exc:  # noqa: BLE001 - any Python-path error must make native decline
        want, err = None, exc
    got = ff._nf.process(payload, event_id, user_id, et, mask)
    if err is not None:
        assert got is None, f"python raised {err!r} but native produced rows"
        return None
    if got is None:
        doc = orjson.loads(payload)
        assert NEG_ZERO.search(payload) or _neg_zero_or_deep(doc) or _big_int(payload), \
            f"undocumented decline: {ff.stats()['declined']}"
        return None
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[0] == w[0] and g[1] == w[1]
        assert g[2] == w[2], f"columns differ:\n native {g[2][:2000]!r}\n python {w[2][:2000]!r}"
        assert g[3] == w[3], f"types differ:\n native {g[3]!r}\n python {w[3]!r}"
    return got


# ------------------------------------------------------------------ building blocks

EDGE_FLOATS = [0.0, -1.5, 1.0, 0.1, 0.3, 1e-5, 9.99999e-6, 1e-6, 1e-7, 2.5e-7, 1e15, 9999999999999998.0, 1e16, 1.5e16,
               1e21, 1e22, 123456789012345.6, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 123.456e-300,
               float(2**53), float(2**64), -1e-300, 0.00001234, 100.0]


def test_float_text_matches_orjson():
    rng = random.Random(7)
    vals = EDGE_FLOATS + [struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(20000)]
    vals += [rng.uniform(-1e6, 1e6) for _ in range(5000)] + [10.0 ** e * rng.random() for e in range(-30, 30) for _ in range(20)]
    for v in vals:
        if v != v or v in (float("inf"), float("-inf")):
            continue
        assert native._format_float(v) == orjson.dumps(v).decode(), v


@SETTINGS
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_text_matches_orjson_hypothesis(v):
    assert native._format_float(v) == orjson.dumps(v).decode()


ts_like = st.one_of(
    st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]{0,8})?)?)?(Z|[+-][0-9]{2}:?[0-9]{2})?\Z"),
    st.sampled_from(["2026-02-29", "2024-02-29", "0000-01-01", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z",
                     "2026-03-01T24:00:00Z", "2026-03-01T12:34:60Z", "2026-03-01T12:34:56.Z", "2026-13-01T00:00:00Z"]),
)


@SETTINGS
@given(ts_like)
def test_timestamp_fast_path_matches_python(s):
    fast_r = native._parse_timestamp_fast(s)
    if fast_r is not None:  # None means "ask Python", which is then exact by construction
        assert fast_r == parse_timestamp(s)


@SETTINGS
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_event_time_matches_python(us):
    fl = Flattener(FlattenOptions())
    try:
        want = fl._event_time(us)
    except Exception:  # noqa: BLE001
        want = None
    assert native._event_time(us) == want


# ------------------------------------------------------------------ whole documents

POLICIES = ["hash", "tokenize", "redact", "drop"]
path_seg = st.one_of(st.sampled_from(["a", "A", "user", "e-mail", "x", "items", "*", "名前", "SSN"]),
                     st.sampled_from(TRICKY_KEYS[:12]).filter(lambda k: k.strip(" .") == k and k and "." not in k))
annotation = st.builds(
    lambda segs, arr, pii, kl: ColumnAnnotation(path=".".join(s + ("[]" if a else "") for s, a in zip(segs, arr)),
                                                pii=pii, keep_last=kl),
    st.lists(path_seg, min_size=1, max_size=3), st.lists(st.booleans(), min_size=3, max_size=3),
    st.sampled_from(POLICIES), st.integers(0, 16))
maskable = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=12), st.sampled_from([" MiXeD@Example.COM ", "Ünïcode ß", "123-45-6789", "\x1f pad \x0b"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["a", "A", "user", "e_mail", "E-Mail", "x", "items", "ssn",
                                                             "名前", "a.x", "user.ssn", "A_x", "items.a", "x__a"]),
                                            inner, max_size=5)),
    max_leaves=20)
COLUMN_NAMES = ["a", "a_b", "user_name", "empty", "n_1", "x", "e_mail", "user__e_mail", "items__a", "a__a", "value",
                "items__value", "a__value", "k_v_string", "u540d_u524d"]
options = st.builds(FlattenOptions, max_depth=st.integers(1, 64), scalar_arrays=st.sampled_from(["repeated", "child"]),
                    detect_timestamps=st.booleans(),
                    timestamp_columns=st.lists(st.sampled_from(COLUMN_NAMES), max_size=4).map(tuple),
                    no_timestamp_columns=st.lists(st.sampled_from(COLUMN_NAMES), max_size=3).map(tuple))
epochs = st.one_of(st.integers(-(2**66), 2**66), st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([1_767_323_045, 1_767_323_045_123, 1_767_323_045_123_456, 1.7e18, 99_999_999_999.5,
                                    "2026-01-02", "2026-01-02T03:04:05+01:00", "not a time"]))

timed = st.dictionaries(st.sampled_from(["a", "x", "value", "e-mail", "A B"]),
                        st.one_of(epochs, st.lists(epochs, max_size=3), st.lists(st.fixed_dictionaries({"a": epochs}),
                                                                                 max_size=2)), max_size=4)
documents = st.dictionaries(keys, st.one_of(json_values, deep_values(), large_arrays, maskable, timed), max_size=8)

def encode(doc, style: int) -> bytes:
    """Payload bytes: orjson when it can (ints <= 64 bits), else stdlib json (ASCII-escaped or not)."""
    if style == 0:
        try:
            return orjson.dumps(doc)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(doc, ensure_ascii=style == 1).encode()


@SETTINGS
@given(doc=documents, opts=options, anns=st.lists(annotation, max_size=4), style=st.integers(0, 2),
       event_id=st.sampled_from(["evt-1", "é\x1f名", ""]))
def test_native_equals_python_on_arbitrary_documents(doc, opts, anns, style, event_id):
    ff = fast.FastFlattener(opts, anns, DEV_KEY, use_native=True)
    assert ff.native
    payload = encode(doc, style)
    check(ff, payload, mask=False, event_id=event_id)
    check(ff, payload, mask=True, event_id=event_id)
    check(ff, payload, mask=True, event_id=event_id)  # warm caches give the same answer


# ------------------------------------------------------------------ the one-pass streaming path

def both_paths(opts, anns):
    """Two native flatteners: one-pass streaming first (the default), and tree path only."""
    streamed = fast.FastFlattener(opts, anns, DEV_KEY, use_native=True)
    tree = fast.FastFlattener(opts, anns, DEV_KEY, use_native=True)
    tree._nf.set_streaming(False)
    return streamed, tree


envelope_ids = st.one_of(st.text(max_size=6), st.integers(-(2**64), 2**64), st.none(), st.booleans(),
                         st.just({"nested": 1}), st.just([1]))
envelope_times = st.one_of(st.sampled_from(["2026-03-01T12:34:56.789Z", "2026-03-01T12:34:56Z", "1970-01-01T00:00:00Z",
                                            "2026-03-01T12:34:56+01:00", "yesterday", "2200-01-01T00:00:00Z"]),
                           st.integers(0, 2**40), st.none())


@SETTINGS
@given(doc=documents, opts=options, anns=st.lists(annotation, max_size=3), style=st.integers(0, 2),
       eid=envelope_ids, uid=envelope_ids, ts=envelope_times, where=st.lists(st.integers(0, 8), min_size=3, max_size=3),
       mask_user=st.sampled_from([None, "tokenize", "hash", "drop"]))
def test_streaming_equals_tree_path(doc, opts, anns, style, eid, uid, ts, where, mask_user):
    """Envelope fields anywhere (before or after arrays, missing, not scalars, masked), any document: the
    streaming path gives exactly what the tree path gives (rows, ids, or a decline), for both entry points."""
    if mask_user:
        anns = [*anns, ColumnAnnotation(path="user.id", pii=mask_user)]
    items = list(doc.items())
    for (k, v), w in zip([("id", eid), ("user", {"id": uid}), ("timestamp", ts)], where):
        if v is not None or w % 2:  # sometimes absent
            items = [(a, b) for a, b in items if a != k]
            items.insert(min(w, len(items)), (k, v))
    payload = encode(dict(items), style)
    streamed, tree = both_paths(opts, anns)
    for _ in range(2):  # cold and warm caches
        assert streamed.native_event(payload, "id", "user.id", "timestamp") == \
            tree.native_event(payload, "id", "user.id", "timestamp")
        for mask in (False, True):
            assert streamed._nf.process(payload, "evt-1", "user-1", ET, mask) == \
                tree._nf.process(payload, "evt-1", "user-1", ET, mask)
        for max_nesting in (3, 32):
            assert streamed._nf.envelope(payload, max_nesting, "id", "user.id", "timestamp") == \
                tree._nf.envelope(payload, max_nesting, "id", "user.id", "timestamp")
    assert streamed.stats()["declined"] == tree.stats()["declined"]


def test_streaming_path_serves_typical_events():
    """The benchmark's and the demo's events go through the one-pass path (no silent fallback to the tree)."""
    from deploy.synth import acme_event

    ff = fast.FastFlattener(FlattenOptions(), ANNOTATIONS, DEV_KEY, use_native=True)
    rng = random.Random(5)
    for i in range(50):
        assert ff.native_event(orjson.dumps(reference_event(i)), "id", "user.id", "timestamp") is not None
        assert ff.rows(orjson.dumps(acme_event(i, rng)), f"e{i}", "u", ET)
        assert ff._nf.envelope(orjson.dumps(reference_event(i)), 32, "id", "user.id", "timestamp") is not None
    s = ff.stats()
    assert s["native_events"] == s["streamed_events"] == 100
    assert s["envelope_events"] == s["streamed_envelopes"] == 50


def _strict(v):
    """A value with its exact type (1 != 1.0 != True) and float bits (0.0 != -0.0)."""
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [_strict(x) for x in v])
    if isinstance(v, dict):
        return ("dict", [(k, _strict(x)) for k, x in v.items()])
    return (type(v).__name__, repr(v))


def check_values(ff, payload, extra=("absent", "_event_id", "_user_id", "_event_time")):
    """``native_event(..., want)``: the 4-tuple as without ``want``, and as 5th element each wanted column's
    value exactly as ``orjson.loads(main row).get(column)`` (every column of the main row asked, in reverse,
    a duplicate name and absent ones)."""
    plain = ff.native_event(payload, "id", "user.id", "timestamp")
    if plain is None:
        assert ff.native_event(payload, "id", "user.id", "timestamp", ("a",)) is None
        return None
    main = orjson.loads(plain[3][0][2])
    want = tuple(reversed(main)) + extra + tuple(main)[:1]
    got = ff.native_event(payload, "id", "user.id", "timestamp", want)
    assert got[:4] == plain and len(got) == 5
    assert _strict(got[4]) == _strict(tuple(main.get(c) for c in want))
    assert ff.native_event(payload, "id", "user.id", "timestamp", ())[4] == ()
    assert ff.native_event(payload, "id", "user.id", "timestamp", ("a", 1))[4] is None  # a non-str name
    return got[4]


def _row_values_ok(b: bytes, names):
    """``_row_values`` (the scanner under ``native_event(..., want)``) is either None (the caller loads the row)
    or exactly ``orjson.loads(b).get(name)`` for each name."""
    got = native._row_values(b, list(names))
    if got is not None:
        doc = orjson.loads(b)
        assert _strict(got) == _strict(tuple(doc.get(n) for n in names)), b
    return got


@SETTINGS
@given(doc=st.dictionaries(st.sampled_from(["a", "b", "a_b", "x1", "\u00e9"]), json_values, max_size=6),
       names=st.lists(st.sampled_from(["a", "b", "a_b", "x1", "\u00e9", "zz"]), max_size=6))
def test_row_values_scanner_equals_orjson_loads(doc, names):
    try:
        b = orjson.dumps(doc)
    except orjson.JSONEncodeError:  # integers beyond 64 bits
        b = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    got = _row_values_ok(b, names)
    if not _neg_zero_or_deep(doc) and not _big_int(b):
        assert got is not None


@pytest.mark.parametrize("b, names, exact", [
    (b'{"a":1,"b":[1,{"c":"}\\""},"]"],"a":2.5}', ["a", "b", "a"], True),  # a duplicate key: the last value
    (b'{"a":1,"b":[1,{"c":"}\\""},"]"],"a":2.5}', ["a"], True),  # ... after a value stepped over
    (b'{"a":"x\\"\\\\","b":true,"c":null}', ["c", "a", "b"], True),
    (b'{"a":{"n":[1,2]},"b":"2026-01-01"}', ["a", "b"], True),
    (b'{}', ["a"], True), (b'{"a":1}', [], True),
    (b'{"a":-0.0,"b":1}', ["b"], True),  # an unwanted -0.0 is only stepped over
    (b'{"a":-0.0,"b":1}', ["a"], False),  # a wanted one: the parser declines (orjson decides)
    (b'{"a":18446744073709551616}', ["a"], False),
    (b'{"a": 1}', ["a"], False), (b'{"\\u0061":1}', ["a"], False),  # not the writer's form
    (b'{"a":1', ["a"], False), (b'[1]', ["a"], False), (b'', ["a"], False), (b'{"a":1}}', ["a"], False),
])
def test_row_values_scanner_edges(b, names, exact):
    if exact:
        orjson.loads(b)  # valid JSON
    assert (_row_values_ok(b, names) is not None) == exact


@SETTINGS
@given(doc=documents, opts=options, anns=st.lists(annotation, max_size=3), style=st.integers(0, 2),
       uid=st.one_of(st.text(max_size=4), st.integers(-(2**63), 2**64 - 1)))
def test_main_row_values_equal_orjson_loads(doc, opts, anns, style, uid):
    """The aggregates' values (``ingest.batch``): any document, masked, both native paths."""
    doc = {**doc, "id": "e-1", "user": {"id": uid}, "timestamp": "2026-03-01T12:34:56.789Z"}
    payload = encode(doc, style)
    for ff in both_paths(opts, anns):
        for _ in range(2):  # cold and warm caches
            check_values(ff, payload)


def test_main_row_values_of_hostile_columns():
    """Floats, NUMERIC strings, masked and dropped columns, JSON columns, lists, escapes, timestamps."""
    vals = EDGE_FLOATS + [0.1, 1e308, -0.0, 2**63 - 1, -(2**63), 2**63 + 5, 2**64 - 1, 2**64 + 1, True, None, "",
                          "q\"\\\n\x01\u00e9\U0001F600\u2028", [1, 2.5], [1, "a"], [[1]], [2**63 + 5, 1], ["a", None],
                          {"x": {"y": {"z": {"w": [1, {"v": 2}]}}}}, "2026-03-01", "2026-03-01T00:00:00+02:00",
                          ["2026-03-01", "2026-03-02"], "1780000000", {}, []]
    anns = ANNOTATIONS + (ColumnAnnotation(path="tok", pii="tokenize"), ColumnAnnotation(path="red", pii="redact",
                                                                                         keep_last=3),
                          ColumnAnnotation(path="gone", pii="drop"))
    opts = FlattenOptions(max_depth=3, timestamp_columns=("ts",))
    seen = 0
    for ff in both_paths(opts, anns):
        for i, v in enumerate(vals):
            doc = {**reference_event(i), "v": v, "tok": v, "red": v, "gone": v, "ts": v}
            got = check_values(ff, encode(doc, 1 if isinstance(v, int) and abs(v) >= 2**63 else 0),
                               extra=("v", "tok", "red", "gone", "ts", "v__x__y", "absent"))
            seen += got is not None
    assert seen >= 2 * (len(vals) - 2)  # only -0.0 and 2**64+1 decline (the Python path decides those)
    s = ff.stats()
    assert s["values_events"] == 2 * s["values_declined"] > 0  # per event: want and (), then ("a", 1)


@pytest.mark.parametrize("payload, streams", [
    (b'{"id":"e","user":{"id":"u"},"timestamp":"2026-03-01T00:00:00Z","a":[{"b":1},null,{"c":[{"d":2}]}]}', True),
    (b'{"a":[{"b":1}],"id":"e","user":{"id":"u"},"timestamp":"2026-03-01T00:00:00Z"}', False),  # array before ids
    (b'{"id":"e","id":"f","user":{"id":"u"},"timestamp":"2026-03-01T00:00:00Z"}', False),  # duplicate key
    (b'{"id":"e","user":{"id":"u"},"timestamp":"2026-03-01T00:00:00Z","A b":1,"a_b":2}', False),  # name collision
    (b'{"id":"e","user":{"id":"u"},"timestamp":"2026-03-01T00:00:00Z","a":[{"b":1},2]}', False),  # mixed array
    (b'{"id":"e","user":[{"id":"u"}],"timestamp":"2026-03-01T00:00:00Z"}', False),  # user id not under objects
    (b'{"id":7,"user":{"id":"u"},"timestamp":"2026-03-01T00:00:00.5Z"}', True),
])
def test_streaming_gives_up_to_the_tree_path(payload, streams):
    streamed, tree = both_paths(FlattenOptions(), ANNOTATIONS)
    assert streamed.native_event(payload, "id", "user.id", "timestamp") == \
        tree.native_event(payload, "id", "user.id", "timestamp")
    assert streamed.stats()["streamed_events"] == int(streams)


@pytest.mark.parametrize("payload", [
    b'{"a":1,"b":2,"a":3}', b' {"a" : [1 , 2.5, -0 ]} ', b'{"a":-0.0}', b'{"a":1e400}', b'{"a":"\\ud800"}',
    b'{"a":"\\ud83d\\ude00 \\u0000 \\"q\\" \\\\ \\/ \\b\\f\\n\\r\\t\x7f"}', b"[1,2]", b'"x"', b"{", b'{"a":1}x',
    b'{"a":18446744073709551615,"b":18446744073709551616,"c":-9223372036854775808,"d":-9223372036854775809}',
    b'{"n":[1,18446744073709551615],"m":[1,2.0],"o":[true,1],"p":[[1],[2]],"q":[null,null],"r":[{"x":1},null,{}]}',
    b'{"t":["2026-01-01","2026-01-02T00:00:00Z"],"u":["2026-01-01T00:00:00+01:00","2026-01-02T00:00:00.5Z"]}',
    b'{"deep":' + b'[' * 200 + b']' * 200 + b'}', b'{"k":' + b'{"k":' * 130 + b'1' + b'}' * 131,
    b'{"A":1,"a":2,"User Name":3,"user_name":4,"USER-NAME":5,"' + b"x" * 400 + b'":6}', b"{}",
    b'{"\xc3\xa9":{"\xe5\x90\x8d":[{"v_string":1,"":2,"_":3}]}}', b'{"bad utf8":"\xff"}',
])
@pytest.mark.parametrize("opts", [FlattenOptions(), FlattenOptions(max_depth=2, scalar_arrays="child"),
                                  FlattenOptions(max_depth=1, detect_timestamps=False)])
def test_native_equals_python_on_edge_payloads(payload, opts):
    ff = fast.FastFlattener(opts, ANNOTATIONS + (ColumnAnnotation(path="*.k", pii="hash"),), DEV_KEY, use_native=True)
    check(ff, payload, mask=False)
    check(ff, payload, mask=True)


@pytest.mark.parametrize("et", [0, -1, 1, 253402300799999999, 253402300800000000, -62135596800000000,
                                -62135596800000001])
def test_event_time_range_and_declines(et):
    ff = fast.FastFlattener(FlattenOptions(), use_native=True)
    check(ff, b'{"a":{"b":[{"c":1}]}}', mask=False, et=et)
    assert ff._nf.process(b"{}", "e", "u", True, False) is None  # bool is not an int event time: Python raises
    assert ff._nf.process(b"{}", 1, "u", 0, False) is None  # non-str id: Python decides


def test_reference_events_and_fused_envelope():
    """The benchmark's events: rows identical, and the fused envelope entry point agrees with the bench's Python path."""
    from datetime import datetime

    ff = fast.FastFlattener(FlattenOptions(), ANNOTATIONS, DEV_KEY, use_native=True)
    for i in range(300):
        payload = orjson.dumps(reference_event(i))
        check(ff, payload, mask=True, event_id=f"evt-{i}", et=ET + i * 7_919_000)
        eid, uid, us, rows = ff.native_event(payload, "id", "user.id", "timestamp")
        doc = ff.masker.mask_doc(orjson.loads(payload))
        et = datetime.fromisoformat(doc["timestamp"]) - datetime.fromisoformat("1970-01-01T00:00:00Z")
        assert (eid, uid) == (doc["id"], doc["user"]["id"])
        assert us == (et.days * 86_400 + et.seconds) * 1_000_000 + et.microseconds
        assert rows == ff.rows_python(payload, eid, uid, us, mask=True)
    assert ff.native_event(b'{"id":"x","user":{"id":"u"},"timestamp":"yesterday"}', "id", "user.id", "timestamp") is None
    s = ff.stats()
    assert s["native_events"] == 600 and s["declined"] == {"envelope": 1}


def test_synthetic_demo_events():
    """deploy/synth.py's partners with the example contract's flatten options and annotations."""
    from deploy.synth import acme_event, nimbus_record, orbit_event
    from ingest.contract import load_contract

    contract = load_contract(os.path.join(ROOT, "examples", "headwater.yaml"))
    rng = random.Random(3)
    gens = {"acme_bank": acme_event, "orbit_retail": orbit_event}
    for p in contract.partners:
        gen = gens.get(p.name, nimbus_record)
        ff = fast.FastFlattener(p.flatten, p.columns, DEV_KEY, use_native=True)
        assert ff.native
        for i in range(200):
            payload = orjson.dumps(gen(i, rng))
            check(ff, payload, mask=True, event_id=f"{p.name}-{i}")
            check(ff, payload, mask=False, event_id=f"{p.name}-{i}")
        assert ff.stats()["declined"] == {}
    assert any(p.flatten.timestamp_columns for p in contract.partners)  # the per-column path is exercised


def test_rows_api_and_fallback_counts(monkeypatch):
    ff = fast.FastFlattener(FlattenOptions(), use_native=True)
    assert ff.rows(b'{"a":1}', "e", "u", 0) == ff.rows_python(b'{"a":1}', "e", "u", 0)
    with pytest.raises(orjson.JSONDecodeError):
        ff.rows(b"{", "e", "u", 0)
    assert ff.rows(b'{"a":-0}', "e", "u", 0)[0][2] == b'{"_event_id":"e","_user_id":"u","_event_time":' \
                                                      b'"1970-01-01T00:00:00.000000Z","a":0}'
    s = ff.stats()
    assert s["native_events"] == 1 and s["declined"] == {"parse": 2} and s["python_events"] == 3
    monkeypatch.setenv("HEADWATER_NO_NATIVE", "1")
    assert not fast.FastFlattener(FlattenOptions()).native


def test_mutated_payloads_never_panic():
    """Byte-level mutations of real events (truncations, insertions of JSON punctuation, control and invalid UTF-8
    bytes, spliced copies) through every native entry point: rows or a decline, never a Rust panic (which would
    surface as a BaseException no DoFn catches)."""
    rng = random.Random(11)
    ffs = [fast.FastFlattener(FlattenOptions(max_depth=d, scalar_arrays=sa),
                              ANNOTATIONS + (ColumnAnnotation(path="items[]", pii="drop"),), DEV_KEY, use_native=True)
           for d in (2, 32) for sa in ("repeated", "child")]
    base = [orjson.dumps(reference_event(i)) for i in range(20)]
    alphabet = b'{}[]",:\\ -0123456789.eE+tfnulrsaZT\x00\x1f\x7f\xc3\xa9\xff'
    for _ in range(3000):
        p = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 5)):
            i = rng.randrange(len(p) + 1)
            op = rng.random()
            if op < 0.3:
                del p[i:i + rng.randint(1, 8)]
            elif op < 0.7:
                p[i:i] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
            else:
                a, b = sorted((rng.randrange(len(p) + 1), rng.randrange(len(p) + 1)))
                p[i:i] = p[a:b][:200]
        p = bytes(p)
        check(ffs[0], p, mask=True)  # and where it produces rows, the Python path's rows
        for ff in ffs:
            ff._nf.process_event(p, "id", "user.id", "timestamp")
            ff._nf.process(p, "e", "u", ET, True)
            ff._nf.envelope(p, 32, "id", "user.id", "timestamp")
    assert sum(ff.stats()["streamed_events"] for ff in ffs) > 0  # some mutations stay valid JSON and stream


# ------------------------------------------------------------------ shape drift (issue 14)

SSN, PAN = "987-65-4321", "4111111111111111"
DRIFT_ANNOTATIONS = (ColumnAnnotation(path="user.ssn", pii="hash"),
                     ColumnAnnotation(path="accounts[].number", pii="redact"),
                     ColumnAnnotation(path="tags[]", pii="drop"),
                     ColumnAnnotation(path="user.*.phone", pii="tokenize"))
DRIFT_DOCS = [
    {"accounts": {"number": PAN}},
    {"accounts": [[{"number": PAN}], [[{"number": PAN}]]], "tags": [["a"], {"b": 1}, "c", None]},
    {"accounts": [{"number": [PAN, [PAN]], "kind": "x"}, {"number": {"full": PAN}}]},
    {"user": [{"ssn": SSN}, [{"ssn": SSN}]], "tags": "solo"},
    {"user": {"ssn": [SSN, SSN], "home": {"phone": "+1 202"}, "a": {"b": {"phone": 7}}}, "USER": {"SSN": SSN}},
    {"user.ssn": SSN, "accounts.number": PAN, "user.home.phone": "+1 202"},
    {"user_ssn": SSN, "user__ssn": SSN, "User-SSN": SSN, "accounts__number": PAN, "accounts_number": [PAN]},
    {"user": {"ssn_last4": "4321"}, "a": {"user": {"ssn": SSN}}, "accounts": [{"numbers": PAN}]},
]


@pytest.mark.parametrize("doc", DRIFT_DOCS)
@pytest.mark.parametrize("opts", [FlattenOptions(), FlattenOptions(max_depth=2, scalar_arrays="child")])
def test_native_equals_python_under_shape_drift(doc, opts):
    """Drifted shapes and literal dotted keys: identical rows on every native entry point, and no raw value."""
    envelope = {"id": "e1", "user": {"id": "u1"}, "timestamp": "2026-03-01T00:00:00Z"}
    for full in (doc, {**envelope, **doc} if "user" not in doc else {**doc, "id": "e1", "timestamp": "x"}):
        payload = orjson.dumps(full)
        streamed, tree = both_paths(opts, DRIFT_ANNOTATIONS)
        for ff in (streamed, tree):
            got = check(ff, payload, mask=True)
            assert got is not None
            if doc is not DRIFT_DOCS[-1]:  # (the last one has no annotated path: nothing to mask)
                assert all(SSN.encode() not in r[2] and PAN.encode() not in r[2] for r in got)
        assert streamed.native_event(payload, "id", "user.id", "timestamp") == \
            tree.native_event(payload, "id", "user.id", "timestamp")
        env = streamed._nf.envelope(payload, 32, "id", "user.id", "timestamp")
        assert env == tree._nf.envelope(payload, 32, "id", "user.id", "timestamp")
        if env is not None:
            assert env[3] == orjson.dumps(streamed.masker.mask_doc(orjson.loads(payload)))


# ------------------------------------------------------------------ per-column timestamp options, natively

def _around(x: float) -> list:
    """``x`` and its neighbours, as ints and as floats, both signs."""
    ints = [int(x) - 1, int(x), int(x) + 1]
    floats = [math.nextafter(x, 0.0), x, math.nextafter(x, math.inf), x - 0.5, x + 0.5]
    return [s * v for v in ints + floats for s in (1, -1)]


Y1_S = -62_135_596_800  # 0001-01-01T00:00:00Z in seconds (the first microsecond of year 1)
Y10000_S = 253_402_300_800  # 10000-01-01T00:00:00Z in seconds (one past the last microsecond of year 9999)
#: values the native side decides itself in a timestamp column (and, like every value, in a no-timestamp column)
PERCOL_COMMON = [
    "2026-03-01T12:34:56Z", "2026-03-01T12:34:56.5Z", "2026-03-01T12:34:56.12Z", "2026-03-01T12:34:56.123Z",
    "2026-03-01T12:34:56.1234Z", "2026-03-01T12:34:56.12345Z", "2026-03-01T12:34:56.123456Z", "2026-03-01T00:00:00Z",
    "2026-03-01", "2024-02-29", "0001-01-01", "9999-12-31", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z",
    0, 1, -1, 7, 1_767_323_045, 1_767_323_045_123, 1_767_323_045_123_456, -1_767_323_045_123_456,
    99_999_999_999, 100_000_000_000, 99_999_999_999_999, 100_000_000_000_000, 10**17 - 1, -(10**17 - 1),
    Y1_S, Y1_S - 1, Y1_S * 1_000, Y1_S * 1_000 - 1, Y1_S * 1_000_000, Y1_S * 1_000_000 - 1, Y1_S + 1, Y1_S * 1000 + 1,
    -99_999_999_999, -62_167_219_200, -62_167_219_200_000,  # year 0: out of range, stored by its own type
    0.0, 0.1, 1.5, -1.5, 1e-7, -1e-7, 2.5e-7, 1_767_323_045.123456, 1_767_323_045_123.5, 1.7673230451234568e15,
    9.999999999999998e16, -9.999999999999998e16, Y1_S + 0.0, Y1_S - 0.5, Y1_S - 1e-6, Y1_S * 1000.0 - 0.25,
    Y1_S * 1e6, Y1_S * 1e6 - 1.0, 5e-324, 123.456e-300,
    *[v for v in _around(1e11) + _around(1e14) if abs(v) < 1e17],
    *_around(1e17)[:2], *[v for v in _around(1e17)[6:] if abs(v) < 1e17],  # 1e17 - 1 (int) and just under 1e17
    True, False,
]
#: values left to the Python callback in a timestamp column
PERCOL_RARE = [
    "2026-03-01T12:34:56+02:00", "2026-03-01T12:34:56-05:30", "2026-03-01 12:34:56", "2026-03-01T12:34:56",
    "2026-03-01t12:34:56z", "2026-03-01T12:34:56.1234567Z", "2026-03-01T12:34:56,5Z", "2026-03-01T12:34Z",
    "2026-02-29", "2026-13-01", "0000-01-01", "0000-12-31T23:59:59Z", "2026-03-01T24:00:00Z", "2026-03-01T12:34:60Z",
    "２０２６-03-01", "not a time", "", "x" * 30, "2026-03-01T12:34:56.Z",
    10**17, -(10**17), 10**17 + 1, 1e17, -1e17, math.nextafter(1e17, math.inf), 1.5e17, 1.7e18, 1e300, -1e300,
    Y10000_S * 1e9, Y10000_S * 1e9 - 1e6, Y1_S * 1e9, 2**63 - 1, -(2**63), 2**63, 2**64 - 1,
]
#: beyond i64/u64 (the parser declines the event: Python flattens it), e.g. nanoseconds around years 1 and 10000
PERCOL_PYTHON_ONLY = [2**64, -(2**64), 10**25, Y10000_S * 10**9, Y10000_S * 10**9 - 1_000, Y1_S * 10**9,
                      Y1_S * 10**9 - 1_000]
PERCOL_TS = ("t", "ev__at", "items__at", "vals__value")
PERCOL_NO_TS = ("n", "items__n", "ev__at", "vals__value")  # (ev__at, vals__value: in both, the timestamp rule wins)
PERCOL_OPTIONS = [
    FlattenOptions(timestamp_columns=PERCOL_TS, no_timestamp_columns=PERCOL_NO_TS, scalar_arrays="child"),
    FlattenOptions(timestamp_columns=PERCOL_TS, no_timestamp_columns=PERCOL_NO_TS, detect_timestamps=False),
    FlattenOptions(timestamp_columns=("n", "items__n"), no_timestamp_columns=PERCOL_TS, scalar_arrays="child",
                   max_depth=3),
]


def _percol_doc(v) -> dict:
    return {"t": v, "ev": {"at": v, "x": 1}, "items": [{"at": v, "n": v}, {"at": v}], "n": v, "vals": [v, v],
            "other": v}


@pytest.fixture
def column_override_calls(monkeypatch):
    """Counts calls of ``Flattener.column_override`` (the native side's callback is that bound method)."""
    calls = [0]
    orig = Flattener.column_override

    def counting(self, v, name, table):
        calls[0] += 1
        return orig(self, v, name, table)

    monkeypatch.setattr(Flattener, "column_override", counting)
    return calls


@pytest.mark.parametrize("opts", PERCOL_OPTIONS)
def test_native_percol_equals_python(opts, column_override_calls):
    """Timestamp / no-timestamp columns (main table, nested object, child tables, scalar child rows): rows
    identical to the Python path on every native path, and the common values (strict ISO strings, integer and
    finite float epochs under 1e17, anything in a no-timestamp column) decided without calling back."""
    paths = both_paths(opts, ())
    kinds = [(v, "common") for v in PERCOL_COMMON] + [(v, "rare") for v in PERCOL_RARE] + \
        [(v, "python") for v in PERCOL_PYTHON_ONLY]
    for v, kind in kinds:
        payload = encode(_percol_doc(v), 0)
        for ff in paths:
            for _ in range(2):  # cold and warm caches
                got = check(ff, payload, mask=False)
                assert (got is None) == (kind == "python"), v
            column_override_calls[0] = 0
            ff._nf.process(payload, "evt-1", "user-1", ET, False)
            if kind == "common":
                assert column_override_calls[0] == 0, f"{v!r} called back into Python"
            elif kind == "rare" and opts is PERCOL_OPTIONS[0]:
                assert column_override_calls[0] > 0, f"{v!r} was expected to be left to Python"
    # no-timestamp columns never call back: every value decided natively
    ff = both_paths(FlattenOptions(no_timestamp_columns=("t", "ev__at", "items__at", "items__n", "n")), ())[0]
    column_override_calls[0] = 0
    for v in PERCOL_COMMON + PERCOL_RARE:
        assert check(ff, encode(_percol_doc(v), 0), mask=False) is not None
        column_override_calls[0] = 0
        ff._nf.process(encode(_percol_doc(v), 0), "evt-1", "user-1", ET, False)
        assert column_override_calls[0] == 0, v


def test_native_percol_typical_event(column_override_calls):
    """The example contract's case (acme's ``event__occurred_at``): no callback per event."""
    from deploy.synth import acme_event

    opts = FlattenOptions(timestamp_columns=("event__occurred_at", "customer__kyc__checked_at"),
                          no_timestamp_columns=("customer__home__phone",))
    ff = fast.FastFlattener(opts, use_native=True)
    rng = random.Random(9)
    for i in range(100):
        payload = orjson.dumps(acme_event(i, rng))
        want = ff.rows_python(payload, f"e{i}", "u", ET)
        column_override_calls[0] = 0
        assert ff._nf.process(payload, f"e{i}", "u", ET, False) == want
        assert column_override_calls[0] == 0
    assert b'"event__occurred_at":"TIMESTAMP"' in want[0][3]
    assert b'"customer__kyc__checked_at":"TIMESTAMP"' in want[0][3]


def test_native_percol_non_finite_and_bad_json():
    """NaN/Infinity are not JSON: the Python path raises and the native side declines (never a row)."""
    ff = fast.FastFlattener(PERCOL_OPTIONS[0], use_native=True)
    for v in (math.nan, math.inf, -math.inf):
        payload = json.dumps(_percol_doc(v)).encode()
        assert check(ff, payload, mask=False) is None
        assert ff._nf.process(payload, "e", "u", ET, False) is None


EPOCH_EDGES = [v for x in (1e11, 1e14, 1e17) for v in _around(x)] + [
    Y1_S, Y1_S - 1, Y1_S * 1000, Y1_S * 1000 - 1, Y1_S * 10**6, Y1_S * 10**6 - 1, Y1_S - 0.5, Y1_S * 1e6 - 1.0,
    Y10000_S, Y10000_S - 1, Y10000_S * 1000, Y10000_S * 10**6 - 1, Y10000_S * 10**6, Y10000_S * 10**9,
    math.nan, math.inf, -math.inf, 2**63, -(2**63), 2**64 - 1, 0.1, -0.1, 1e-7, -1e-7, 5e-324, 1.7976931348623157e308]


@SETTINGS
@given(st.one_of(st.sampled_from(EPOCH_EDGES), st.integers(-(2**66), 2**66), st.integers(-(10**17), 10**17),
                 st.floats(), st.floats(-1e17, 1e17)))
def test_epoch_fast_path_matches_python(v):
    """The native epoch rule: decides every int / finite float under 1e17 exactly as ``epoch_to_timestamp``
    (None = out of years 1..9999, Python's OverflowError), and leaves the rest (>= 1e17, NaN, inf) to Python."""
    decided, got = native._epoch_timestamp_fast(v)
    assert decided == (math.isfinite(v) and abs(v) < 1e17), v
    if decided:
        assert got == epoch_to_timestamp(v), v
