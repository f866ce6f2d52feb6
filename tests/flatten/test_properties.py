"""Property tests: arbitrary nested JSON never escapes the dead-letter path; output is deterministic."""
import copy
import hashlib
import os
import re
import subprocess
import sys

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatten.core import ENVELOPE_COLUMNS, CHILD_COLUMNS, FlattenError, Flattener, child_row_id
from flatten.mask import Masker
from flatten.options import ColumnAnnotation, FlattenOptions

LEGAL = re.compile(r"^[a-z][a-z0-9_]{0,299}$")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])

# Keys chosen to collide after normalisation, hit reserved prefixes, or be empty / unicode.
TRICKY_KEYS = ["a", "A", "a ", " a", "_a", "a_", "a__b", "a.b", "user_name", "User Name", "USER-NAME", "",
               "_", "__ROOT__", "_PARTITIONTIME", "_TABLE_SUFFIX", "_event_id", "_row_id", "1", "1st", "v_string",
               "名前", "Émile", "emile", "ß", "😀", "x" * 400]
keys = st.one_of(st.sampled_from(TRICKY_KEYS), st.text(max_size=12))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["2026-01-02", "2026-01-02T03:04:05Z", "2026-01-02T03:04:05.123+05:30", "0001-01-01T00:00:00-01:00",
                     "9999-12-31T23:59:59+-1", "2026-02-30"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(keys, inner, max_size=6)),
    max_leaves=25,
)


@st.composite
def deep_values(draw):
    """A value wrapped in up to 64 levels of objects/arrays (envelope max_nesting default)."""
    v = draw(json_values)
    for is_list, k in draw(st.lists(st.tuples(st.booleans(), keys), max_size=63)):
        v = [v] if is_list else {k: v}
    return v


large_arrays = st.one_of(
    st.lists(st.integers(), min_size=50, max_size=150),
    st.lists(st.fixed_dictionaries({"k": st.integers(), "s": st.text(max_size=3)}), min_size=50, max_size=150),
)
documents = st.dictionaries(keys, st.one_of(json_values, deep_values(), large_arrays), max_size=8)
options = st.builds(FlattenOptions, max_depth=st.integers(1, 64), scalar_arrays=st.sampled_from(["repeated", "child"]),
                    detect_timestamps=st.booleans())


def flatten_or_dead_letter(fl, doc, event_id="evt-1"):
    try:
        return fl.flatten(doc, event_id=event_id, user_id="u", event_time_us=1_767_323_045_000_000)
    except FlattenError as exc:  # the dead-letter path; anything else fails the test
        assert exc.reason in {"unencodable", "unsupported_type", "too_many_columns", "bad_event_time"}
        return None


@SETTINGS
@given(doc=documents, opts=options)
def test_never_raises_outside_dead_letter_path_and_output_is_legal(doc, opts):
    before = copy.deepcopy(doc)
    rows = flatten_or_dead_letter(Flattener(opts), doc)
    assert doc == before
    if rows is None:
        return
    assert rows[0].table == "" and rows[0].row_id == "evt-1"
    ids = [r.row_id for r in rows]
    assert len(set(ids)) == len(ids)
    for r in rows:
        orjson.dumps(r.columns)
        assert set(r.columns) == set(r.types)
        envelope = ENVELOPE_COLUMNS if r.table == "" else CHILD_COLUMNS
        assert tuple(r.columns)[: len(envelope)] == envelope
        for c in list(r.columns)[len(envelope):]:
            assert LEGAL.match(c), c
        for t in r.types.values():
            assert t.rstrip("[]") in {"BOOL", "INT64", "FLOAT64", "NUMERIC", "STRING", "TIMESTAMP", "DATE", "JSON"}
        if r.table:
            assert LEGAL.match(r.table)


@SETTINGS
@given(doc=documents, opts=options)
def test_deterministic_across_instances_and_compiled_plans(doc, opts):
    a = flatten_or_dead_letter(Flattener(opts), doc)
    warm = Flattener(opts)
    for _ in range(3):  # third call runs compiled plans
        b = flatten_or_dead_letter(warm, copy.deepcopy(doc))
    generic = Flattener(opts)
    generic.compile_enabled = False
    c = flatten_or_dead_letter(generic, doc)
    assert a == b == c
    if a is not None:
        assert [list(r.columns) for r in a] == [list(r.columns) for r in b] == [list(r.columns) for r in c]
        assert [list(r.types) for r in a] == [list(r.types) for r in b]


@SETTINGS
@given(doc=documents, event_id=st.text(min_size=1, max_size=10))
def test_child_ids_are_the_documented_hash(doc, event_id):
    rows = flatten_or_dead_letter(Flattener(FlattenOptions(max_depth=64)), doc, event_id)
    if rows is None:
        return
    for r in rows[1:]:
        c = r.columns
        assert r.row_id == c["_row_id"] == child_row_id(event_id, c["_parent_row_id"], r.table, c["_index"])
        assert c["_event_id"] == event_id


annotations = st.lists(
    st.builds(ColumnAnnotation,
              path=st.lists(st.one_of(st.sampled_from(["*", "a", "user", "ssn", "A", "_a", "items[]", "[]"]),
                                      st.from_regex(r"[a-z]{1,3}(\[\])?", fullmatch=True)),
                            min_size=1, max_size=4).map(".".join).filter(lambda p: p.replace("[]", "").strip(".")),
              pii=st.sampled_from(["hash", "tokenize", "redact", "drop"])),
    max_size=4, unique_by=lambda a: a.path)


@SETTINGS
@given(doc=documents, anns=annotations)
def test_masking_never_raises_and_masked_doc_flattens_or_dead_letters(doc, anns):
    masker = Masker(anns, b"k" * 32)
    before = copy.deepcopy(doc)
    out = masker.mask_doc(doc)
    assert doc == before and isinstance(out, dict)
    assert masker.mask_doc(doc) == out  # deterministic
    flatten_or_dead_letter(Flattener(FlattenOptions()), out)
    payload = masker.protect_payload(orjson.dumps(doc) if _encodable(doc) else b"{")
    assert isinstance(payload, bytes)


def _encodable(doc):
    try:
        orjson.dumps(doc)
        return True
    except orjson.JSONEncodeError:
        return False


_SCRIPT = r"""
import hashlib, random, sys, orjson
from flatten.core import Flattener
from flatten.options import FlattenOptions
rnd = random.Random(7)
KEYS = ["a", "A", "b", "", "_x", "items", "名", "User Name", "user_name"]
def val(d):
    r = rnd.random()
    if d > 5 or r < 0.4:
        return rnd.choice([None, True, 1, 2**64, 1.5, "s", "2026-01-02T00:00:00Z"])
    if r < 0.7:
        return [val(d + 1) for _ in range(rnd.randint(0, 4))]
    return {rnd.choice(KEYS): val(d + 1) for _ in range(rnd.randint(0, 4))}
fl = Flattener(FlattenOptions())
h = hashlib.sha256()
for i in range(300):
    doc = {rnd.choice(KEYS): val(0) for _ in range(5)}
    for r in fl.flatten(doc, event_id=f"e{i}", user_id="u", event_time_us=i):
        h.update(orjson.dumps([r.table, r.row_id, r.columns, r.types]))
print(h.hexdigest())
"""


def test_output_and_child_ids_stable_across_processes():
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        outs.add(res.stdout.strip())
    assert len(outs) == 1 and len(outs.pop()) == 64
    assert hashlib.sha256(b"").hexdigest()  # sanity: hashlib available
