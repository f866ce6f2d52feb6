"""Property: annotated raw values never leave the pipeline, whatever shape the partner's payload drifts to.

Documents are generated around a pool of annotations (``user.ssn``, ``accounts[].number``, ``tags[]``,
``user.*.phone``, ``contact.e-mail``) with the annotated values planted under drifted shapes: objects
where the contract says list and lists where it says object, lists of lists, literal dotted keys
(``"user.ssn"``), equivalent spellings (``USER``/``Ssn``, ``e mail``, ``_user_``), objects and scalar lists
at the leaf, big integers, inside deep or malformed payloads, with the envelope fields present, missing or
wrong. Every output of the pure pipeline stages the DoFns call (ParseEnvelope's ``EnvelopeParser`` with and
without the compiled path, FlattenEvents' ``FastFlattener.rows`` native and Python, every dead letter's
payload, message and ref) must be free of every planted raw value. One test runs generated batches through
the real Beam pipeline into DuckDB and scans every table.

CI runs a modest number of examples; ``tests/long/pii_drift.py`` runs 100,000.
"""
from __future__ import annotations

import json
import os

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatten.core import FlattenError
from flatten.fast import FastFlattener
from flatten.mask import Masker
from flatten.options import ColumnAnnotation, FlattenOptions
from flatten.records import DeadLetter, Event, RawMessage
from ingest.contract import EnvelopeSpec
from ingest.envelope import EnvelopeParser

KEY = b"property-test-key-0123456789abcdef"
EXAMPLES = int(os.environ.get("HEADWATER_PII_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

# annotation path -> drifted spellings of each step (same name tokens, different containers / keys)
POOL = {
    "user.ssn": [["user", "User", "USER", "_user_"], ["ssn", "SSN", "Ssn "]],
    "accounts[].number": [["accounts", "Accounts"], ["number", "NUMBER", "number_"]],
    "tags[]": [["tags", "TAGS", " tags"]],
    "user.*.phone": [["user", "User"], ["home", "work_cell", "a"], ["phone", "Phone"]],
    "contact.e-mail": [["contact", "CONTACT"], ["e-mail", "e_mail", "E Mail", "e.mail"]],
}
POLICIES = ["hash", "tokenize", "redact", "drop"]
ENV = EnvelopeSpec(event_id="id", user_id="user.id", event_time="timestamp", max_nesting=40,
                   max_payload_bytes=200_000)

_LETTERS = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ"


def _letters(n: int) -> str:
    out = []
    for _ in range(12):
        n, r = divmod(n, len(_LETTERS))
        out.append(_LETTERS[r])
    return "RAW" + "".join(out)


# one draw per secret (cheap to generate: the long run draws millions)
secret_text = st.integers(0, len(_LETTERS) ** 12 - 1).map(_letters)
secret_int = st.integers(10**13, 10**15).map(lambda n: n * 1000 + 777) | st.integers(2**66, 2**70)
secret = secret_text | secret_int
filler = st.sampled_from([None, True, -7, 3.5, "x", "", [], {}, [1, "y", None], {"x": {"y": [None, 2]}},
                          [[{"z": "q"}]], {"items": [{"x": 1}, {"x": "2"}]}])


# Strategies are built once (hypothesis validates each strategy object on first use: building them per draw
# made generation dominate the long run).
_STEPS = {p: [st.sampled_from(opts) for opts in steps] for p, steps in POOL.items()}
_INT = {n: st.integers(0, n) for n in (1, 2, 4, 5, 10, 99)}
_BOOL = st.booleans()
_SEP = st.sampled_from([".", "_", "__", "-", " "])
_PATHS = st.lists(st.sampled_from(sorted(POOL)), min_size=1, max_size=4, unique=True)
_POLICY = st.sampled_from(POLICIES)
_KEEP = st.integers(0, 6)
_TOP = st.dictionaries(st.sampled_from(["a", "b", "items", "meta"]), filler, max_size=3)
_BAD_TIME = st.sampled_from(["soon", 17, "2026-13-45"])


def leaf(draw, secrets: list):
    """The annotated value: a secret, a list (of lists) of secrets, or an object holding secrets."""
    kind = draw(_INT[4])
    s = draw(secret)
    secrets.append(s)
    if kind <= 1:
        return s
    if kind == 2:
        t = draw(secret)
        secrets.append(t)
        return [s, [t]] if draw(_BOOL) else [s, t, None]
    if kind == 3:
        return {"full": s, "n": draw(filler)}
    return [{"v": s}]


def planted(draw, path: str, secrets: list) -> dict:
    """A fragment placing a leaf at ``path`` (drifted), as a dict to merge into the document."""
    steps = [draw(opts) for opts in _STEPS[path]]
    node = leaf(draw, secrets)
    # build inside-out; at each step choose: nested object, list around it, or fuse with the next key
    for i in range(len(steps) - 1, -1, -1):
        how = draw(_INT[5])
        if how == 0 and i + 1 < len(steps) and isinstance(node, dict) and len(node) == 1:
            (k, v), = node.items()
            node = {f"{steps[i]}{draw(_SEP)}{k}": v}  # literal dotted key
            continue
        if how == 1:
            node = [node]
        elif how == 2:
            node = [[node], draw(filler)]
        node = {steps[i]: node}
    return node


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if k in out and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


@st.composite
def case(draw):
    """(annotations, payload bytes, planted secrets)."""
    paths = draw(_PATHS)
    anns = [ColumnAnnotation(path=p, pii=draw(_POLICY), keep_last=draw(_KEEP)) for p in paths]
    secrets: list = []
    doc: dict = draw(_TOP)
    for p in paths:
        for _ in range(1 + draw(_INT[1])):
            doc = _merge(doc, planted(draw, p, secrets))
    env = draw(_INT[10])  # 1..5: a way to become a dead letter; else a well-formed envelope
    env = env if env <= 5 else 0
    if env != 1:
        doc.setdefault("id", f"e{draw(_INT[99])}")
    if env != 2 and isinstance(doc.get("user", {}), dict):
        doc["user"] = {**doc.get("user", {}), "id": "u1"}
    doc["timestamp"] = "2026-03-01T12:00:00Z" if env != 3 else draw(_BAD_TIME)
    items = list(doc.items())
    order = draw(st.permutations(range(len(items))))
    doc = dict(items[i] for i in order)
    payload = json.dumps(doc).encode()
    if env == 4:
        payload = payload[: draw(st.integers(1, max(1, len(payload) - 1)))]  # malformed (truncated)
    elif env == 5:
        for _ in range(45):
            doc = {"deep": doc}
        payload = json.dumps(doc).encode()  # too deep for max_nesting
    return anns, payload, secrets


def _needles(s) -> list[bytes]:
    t = str(s)
    return [t.encode(), json.dumps(t).encode()[1:-1]] if isinstance(s, str) else [t.encode()]


_STAGES: dict = {}


def _stages(anns, native: bool) -> tuple:
    """(EnvelopeParser, FastFlattener) per annotation set and path, built once as DoFn.setup does."""
    key = (tuple(anns), native)
    st_ = _STAGES.get(key)
    if st_ is None:
        ff = FastFlattener(FlattenOptions(max_depth=4), anns, KEY, use_native=native)
        st_ = _STAGES[key] = (EnvelopeParser(ENV, Masker(anns, KEY), native=ff if native else None),
                              FastFlattener(FlattenOptions(max_depth=4), use_native=native))
    return st_


def pipeline_outputs(anns, payload: bytes) -> list[bytes]:
    """Everything the ParseEnvelope + FlattenEvents steps emit for one payload, by both code paths."""
    out: list[bytes] = []
    for native in (True, False):
        parser, flattener = _stages(anns, native)
        r = parser.parse(RawMessage("acme", "file", "file:x:1", payload, b"{}", 0), 1)
        if isinstance(r, DeadLetter):
            out += [r.payload, r.message.encode(), r.payload_ref.encode(), r.coords.encode()]
            continue
        assert isinstance(r, Event)
        out += [r.doc, r.event_id.encode(), r.user_id.encode()]
        try:
            rows = flattener.rows(r.doc, r.event_id, r.user_id, r.event_time_us)
        except FlattenError as exc:
            out += [str(exc).encode()]
            continue
        for table, rid, cols, types in rows:
            out += [table.encode(), rid.encode(), cols, types]
    return out


def assert_no_raw(secrets, outputs: list[bytes]) -> None:
    blob = b"\n".join(outputs)
    for s in secrets:
        for n in _needles(s):
            assert n not in blob, f"raw annotated value {s!r} found in the pipeline's output"


@SETTINGS
@given(case())
def test_no_raw_annotated_value_in_any_output(c):
    anns, payload, secrets = c
    assert_no_raw(secrets, pipeline_outputs(anns, payload))


@settings(max_examples=int(os.environ.get("HEADWATER_PII_PIPELINE_EXAMPLES", "3")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(case(), min_size=10, max_size=25), st.sampled_from(POLICIES))
def test_whole_beam_pipeline_leaves_no_raw_value(tmp_path_factory, cases, policy):
    """Generated payloads through the real pipeline (FnApiRunner -> DuckDB); every table and column scanned."""
    import apache_beam as beam
    import duckdb
    from apache_beam.testing.test_pipeline import TestPipeline

    from ingest.contract import parse_contract
    from ingest.pipeline import build

    tmp = tmp_path_factory.mktemp("drift")
    anns = [{"path": p, "pii": policy} for p in sorted(POOL)]
    contract = parse_contract({
        "warehouse": {"kind": "duckdb", "path": str(tmp / "wh.duckdb")},
        "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": "unused/*.jsonl"}],
                      "envelope": ENV.model_dump(), "columns": anns, "flatten": {"max_depth": 4},
                      "table": {"name": "acme_events"}}]})
    secrets = [s for _, _, ss in cases for s in ss]
    msgs = [RawMessage("acme", "file", f"file:t:{n}", p, b"{}", 0) for n, (_, p, _) in enumerate(cases, 1)]
    with TestPipeline(runner="FnApiRunner") as p:
        build(p, contract, source_overrides={"Read_acme_file_0": beam.Create(msgs)}, require_overrides=True)
    con = duckdb.connect(str(tmp / "wh.duckdb"), read_only=True)
    try:
        dumps = []
        for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            for row in con.execute(f'SELECT * FROM "{t}"').fetchall():
                dumps.extend(bytes(v) if isinstance(v, (bytes, bytearray)) else str(v).encode() for v in row)
        n = con.execute("SELECT count(*) FROM acme_events").fetchone()[0] + \
            con.execute("SELECT count(*) FROM dead_letters WHERE source <> 'warehouse'").fetchone()[0]
    finally:
        con.close()
    assert n <= len(cases)  # (duplicate event ids are dropped)
    assert_no_raw(secrets, dumps)
