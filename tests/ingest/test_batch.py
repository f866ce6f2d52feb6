"""BatchProcessor (one call per batch) equals ParseEnvelope + FlattenEvents (one call per record and step)."""
from __future__ import annotations

import json
import random

import orjson
import pytest

from deploy import synth
from flatten.core import FlattenError
from flatten.fast import FastFlattener
from flatten.mask import Masker, load_mask_key
from flatten.options import FlattenOptions
from flatten.records import Event, RawMessage, TableRow
from ingest.batch import BatchProcessor, metric_columns
from ingest.contract import parse_contract
from ingest.envelope import EnvelopeParser
from tests.flatten.test_native import _strict  # a value with its exact type and float bits

NOW = 1_790_000_000_000_000
ACME_AGG = {"name": "activity", "windows": ["lifetime", "7d"],
            "metrics": [{"name": "n", "fn": "count"}, {"name": "spend", "fn": "sum", "column": "transaction__amount"},
                        {"name": "ch", "fn": "latest", "column": "event__channel"}]}


def _acme(columns: list, aggregates: list) -> dict:
    """The acme partner of these tests' contracts, with its PII annotations and aggregates."""
    return {"name": "acme", "sources": [{"kind": "file", "pattern": "unused/*.jsonl"}],
            "envelope": {"event_id": "event.id", "user_id": "customer.id", "event_time": "event.occurred_at",
                         "max_nesting": 20, "max_payload_bytes": 20_000},
            "flatten": {"max_depth": 4, "timestamp_columns": ["event__occurred_at"]},
            "columns": [{"path": "customer.email", "pii": "tokenize"}, {"path": "customer.ssn", "pii": "hash"},
                        {"path": "customer.name", "pii": "drop"}, *columns,
                        {"path": "accounts[].number", "pii": "redact", "keep_last": 4}],
            "table": {"name": "acme_events"},
            "aggregates": aggregates}


def contract():
    return parse_contract({
        "warehouse": {"kind": "duckdb", "path": "unused.duckdb"},
        "masking": {"key_env": "HW_TEST_BATCH_KEY", "allow_dev_key": True},
        "partners": [
            _acme([], [ACME_AGG, {**ACME_AGG, "name": "by_merchant", "key": "transaction__merchant__id"}]),
            {"name": "orbit", "sources": [{"kind": "file", "pattern": "unused/*.jsonl"}],
             "envelope": {"event_id": "offer_event_id", "user_id": "shopper.uid", "event_time": "ts_ms",
                          "event_time_format": "epoch_ms"},
             "flatten": {"scalar_arrays": "child", "schema_mode": "freeze"},
             "columns": [{"path": "shopper.email", "pii": "tokenize"}],
             "table": {"name": "orbit_offers"}},
            {"name": "attr", "sources": [{"kind": "file", "pattern": "unused/*.jsonl"}],
             "envelope": {"event_id": "attribute:eid", "user_id": "u", "event_time": "t"},
             "table": {"name": "attr_events"}},
        ],
    })


def reference(c, msgs):
    """What ParseEnvelope + FlattenEvents do, record by record."""
    m = c.masking
    key = load_mask_key(m.key_env, m.key_file, m.allow_dev_key)
    rows, dead, entries = [], [], []
    for msg in msgs:
        p = next((p for p in c.partners if p.name == msg.partner), None)
        if p is None:
            dead.append(("unknown_partner", msg.coords))
            continue
        parser = EnvelopeParser(p.envelope, Masker(p.columns, key), step="ParseEnvelope",
                                native=FastFlattener(FlattenOptions(), p.columns, key))
        out = parser.parse(msg, NOW)
        if not isinstance(out, Event):
            dead.append(_plain(out))
            continue
        try:
            ev_rows = FastFlattener(p.flatten).rows(out.doc, out.event_id, out.user_id, out.event_time_us)
        except (FlattenError, RecursionError, ValueError, TypeError) as exc:
            dead.append(("flatten", msg.coords, type(exc).__name__))
            continue
        for sub, row_id, cols, types in ev_rows:
            rows.append(TableRow(p.name, p.table.name if not sub else f"{p.table.name}__{sub}", row_id,
                                 out.event_id, out.event_time_us, cols, types))
        main = orjson.loads(ev_rows[0][2])
        aggs = []
        for i, a in enumerate(p.aggregates):
            k = out.user_id if a.key == "user_id" else main.get(a.key)
            if k is None or isinstance(k, (list, dict)):
                continue
            aggs.append((i, str(k), {col: main.get(col) for col in metric_columns(a)}))
        entries.append((out.event_id, out.event_time_us, aggs))
    return rows, dead, entries


def normalized(c, res):
    dead = []
    for d in res.dead:
        if d.reason == "unknown_partner":
            dead.append(("unknown_partner", d.coords))
        elif d.step == "FlattenEvents":
            dead.append(("flatten", d.coords, d.error_class))
        else:
            dead.append(_plain(d))
    aggs_of = {p.name: p.aggregates for p in c.partners}
    entries = []
    for e in res.entries:
        partner = "acme"  # only acme declares aggregates; the others' entries carry none
        entries.append((e.event_id, e.event_time_us,
                        [(i, k, dict(zip(metric_columns(aggs_of[partner][i]), v))) for i, k, v in e.aggs]))
    return res.rows, dead, entries


def _plain(d):
    """Dead letter without its processing time, and encrypted payloads (random nonce) reduced to their prefix."""
    payload = d.payload[:7] if d.payload.startswith(b"enc:v1:") else d.payload
    return d._replace(processing_time_us=0, payload=payload)


def messages():
    rng = random.Random(11)
    out = []
    good = None
    for i in range(300):
        ev = synth.acme_event(i, rng, users=40, extra=i % 3 == 0)
        if i % 50 == 7:
            ev["transaction"].pop("merchant")  # no key for by_merchant
        good = ev
        out.append(("acme", orjson.dumps(ev)))
    for line in synth.hostile_lines(good):
        out.append(("acme", line))
    for levels in range(14, 20):  # depth around max_nesting=20, few other brackets: the fused path's guard
        deep = {"leaf": [1]}
        for _ in range(levels):
            deep = {"n": deep}
        out.append(("acme", orjson.dumps({"event": {"id": f"deep-{levels}", "occurred_at": "2026-11-01T00:00:00Z"},
                                          "customer": {"id": "u"}, "d": deep})))
    for extra in ({"many": [[1], [2], [3], [4], [5], [6], [7], [8], [9]]}, {"brackets_in_text": "{{{{{{{{{{{{{{[[[[[["}):
        ev = dict(good)
        ev.update(extra)
        ev["event"] = {**good["event"], "id": f"edge-{len(out)}"}
        out.append(("acme", orjson.dumps(ev)))
    out += [("acme", b'{"event": {"id": 7, "occurred_at": "2026-11-01T00:00:00Z"}, "customer": {"id": 12}}'),
            ("acme", b'{"event": {"id": "", "occurred_at": "2026-11-01T00:00:00Z"}, "customer": {"id": "u"}}'),
            ("acme", b'{"event": {"id": "x", "occurred_at": 1780000000}, "customer": {"id": "u"}}'),
            ("acme", b'{"event": {"id": "x2", "occurred_at": "2026-11-01T00:00:00+02:00"}, "customer": {"id": "u"}}'),
            ("acme", b'{"event": {"id": "neg0", "occurred_at": "2026-11-01T00:00:00Z"}, "customer": {"id": "u"}, "v": -0.0}'),
            ("acme", b"  "), ("ghost", b'{"a": 1}')]
    for i in range(40):
        out.append(("orbit", orjson.dumps(synth.orbit_event(i, rng))))
    out.append(("attr", b'{"u": "u1", "t": "2026-11-01T00:00:00Z"}'))
    return [RawMessage(p, "file", f"file:x:{n}", pl, b'{"eid": "a1"}' if p == "attr" else b"{}", 0)
            for n, (p, pl) in enumerate(out, 1)]


@pytest.mark.parametrize("batch", [1, 37, 10_000])
def test_batch_equals_the_per_record_steps(batch):
    c = contract()
    msgs = messages()
    proc = BatchProcessor(c)
    rows, dead, entries = [], [], []
    for i in range(0, len(msgs), batch):
        r = normalized(c, proc.process(msgs[i:i + batch], NOW))
        rows += r[0]
        dead += r[1]
        entries += r[2]
    want_rows, want_dead, want_entries = reference(c, msgs)
    assert rows == want_rows
    assert dead == want_dead
    assert entries == want_entries
    assert len(want_rows) > 600 and len(want_dead) >= 10 and len(want_entries) > 300


def test_fused_path_is_taken_and_counted():
    c = contract()
    proc = BatchProcessor(c)
    res = proc.process(messages(), NOW)
    # well-formed acme events take the single native call; the rest went through the Python parser
    from flatten.fast import native_available

    if native_available():
        assert res.python_envelope < 80  # hostile lines, orbit (epoch_ms), attribute locators, edge cases
    _, _, want = reference(c, messages())
    acme_ids = {m.coords for m in messages() if m.partner == "acme"}
    assert acme_ids and res.key_missing == sum(2 - len(aggs) for eid, _, aggs in want if not eid.startswith("orb-")
                                               and eid != "a1") >= 6  # e.g. events without a merchant id


def test_keep_rows_carries_each_events_rows_in_its_entry():
    c = contract()
    msgs = messages()[:20]
    plain = BatchProcessor(c).process(msgs, NOW)
    kept = BatchProcessor(c, keep_rows=True).process(msgs, NOW)
    assert kept.rows == [] and [r for e in kept.entries for r in e.rows] == plain.rows


# ------------------------------------------------------------------ aggregate values from the native call

#: metric columns of every kind a main row holds: float, str, masked (tokenize, hash, redact, drop), REPEATED,
#: bool, int, a timestamp column, JSON columns (mixed arrays, nesting beyond max_depth), a free column ``m``
#: taking hostile values, its flattened sub-column, and timestamp-looking strings (detected)
_VALUE_COLS = ["transaction__amount", "event__channel", "customer__email", "customer__ssn", "customer__name",
               "customer__segments", "customer__kyc__verified", "customer__kyc__level", "event__occurred_at",
               "m", "m__x", "secret", "when", "deep__a__b__c", "absent_always"]

#: values for ``m`` / ``secret`` / ``when``: nothing the main row could hold goes untried
_HOSTILE = [None, 0, -5, 7, True, False, "", "plain", "x\"y\\\n\u0001\u00e9\U0001F600", 0.1, 1e308, -0.0, 1e-7,
            5e-324, 123456789.123456789, 1e16, 1e15 + 0.5, -2.5e-300, 2 ** 63 - 1, -2 ** 63, 2 ** 63 + 5, 2 ** 64 - 1,
            2 ** 64 + 1, 10 ** 30, {"x": 1}, {"x": [1, 2]}, {"x": None}, {}, [], [None], [1, 2], [1, 2.5], [1, "a"],
            [[1], [2]], [{"k": 1}], [True, None, False], ["a", None, "b"], [0.1, 1e308], [2 ** 63 + 5, 1],
            "2026-11-01T00:00:00Z", "2026-11-01", "2026-11-01T10:20:30.123456+02:00", "2026-13-45",
            ["2026-11-01T00:00:00Z", "2026-11-02"], ["2026-11-01", "2026-11-02"], "1780000000", 1780000000,
            1780000000.5, 1e17, "not a time", {"a": {"b": {"c": {"d": 1}}}}]


def _values_contract():
    agg = {"name": "vals", "windows": ["lifetime"],
           "metrics": [{"name": "n", "fn": "count"}] +
                      [{"name": f"v{i}", "fn": "latest", "column": c} for i, c in enumerate(_VALUE_COLS)]}
    return parse_contract({
        "warehouse": {"kind": "duckdb", "path": "unused.duckdb"},
        "masking": {"key_env": "HW_TEST_BATCH_KEY", "allow_dev_key": True},
        "partners": [
            _acme([{"path": "secret", "pii": "redact", "keep_last": 3}],
                  [agg, ACME_AGG,
                   {**ACME_AGG, "name": "by_m", "key": "m"},  # keys of every type: str(key), lists skipped
                   {**ACME_AGG, "name": "by_email", "key": "customer__email"},  # a masked key
                   {**ACME_AGG, "name": "by_secret", "key": "secret",
                    "metrics": [{"name": "s", "fn": "latest", "column": "secret"},
                                {"name": "w", "fn": "latest", "column": "when"}]}]),
            {"name": "plain", "sources": [{"kind": "file", "pattern": "unused/*.jsonl"}],
             "envelope": {"event_id": "id", "user_id": "u", "event_time": "t"},
             "table": {"name": "plain_events"}},
        ],
    })


def _values_messages(n=900):
    rng = random.Random(5)
    out = []
    for i in range(n):
        ev = synth.acme_event(i, rng, users=60, extra=i % 4 == 0)
        pick = lambda: _HOSTILE[rng.randrange(len(_HOSTILE))]  # noqa: E731
        if i % 3:
            ev["m"] = pick()
        if i % 2:
            ev["secret"] = pick()
        if i % 5:
            ev["when"] = pick()
        if i % 7 == 0:
            ev["deep"] = {"a": {"b": {"c": pick()}}}
        if i % 11 == 0:
            ev["transaction"].pop("amount")
        if i % 13 == 0:
            ev["event"].pop("channel")
            ev["customer"].pop("email")
        if i % 17 == 0:
            ev["transaction"]["amount"] = pick()
        try:
            payload = orjson.dumps(ev)
        except TypeError:  # integers beyond 64 bits
            payload = json.dumps(ev, ensure_ascii=i % 2 == 0).encode()
        out.append(RawMessage("acme", "file", f"file:v:{i}", payload, b"{}", 0))
    out.append(RawMessage("plain", "file", "file:p:1", b'{"id": "p1", "u": "u", "t": "2026-11-01T00:00:00Z"}', b"{}", 0))
    return out


@pytest.mark.parametrize("streaming", [True, False])
def test_aggregate_values_from_the_native_call_equal_orjson_loads_of_the_main_row(streaming):
    c = _values_contract()
    msgs = _values_messages()
    fast = BatchProcessor(c)
    slow = BatchProcessor(c, native_values=False)
    for bp in (fast, slow):
        if bp._partners["acme"].fused is not None:
            bp._partners["acme"].fused.__self__.set_streaming(streaming)
    got = fast.process(msgs, NOW)
    want = slow.process(msgs, NOW)
    assert got.rows == want.rows and got.dead == want.dead and got.key_missing == want.key_missing
    assert [(e.event_id, e.event_time_us) for e in got.entries] == [(e.event_id, e.event_time_us) for e in want.entries]
    assert [_strict(e.aggs) for e in got.entries] == [_strict(e.aggs) for e in want.entries]
    # and both equal the per-element steps (orjson.loads of the reference main row)
    _, _, ref = reference(c, msgs)
    assert normalized(c, got)[2] == ref
    # the hostile values really reached the aggregates, through both paths
    seen = {type(v).__name__ for e in got.entries for _, _, vals in e.aggs for v in vals}
    assert {"NoneType", "str", "int", "float", "bool", "list"} <= seen
    # (integers beyond INT64 are NUMERIC: the main row holds them as strings)
    assert any(v == str(2 ** 63 + 5) for e in got.entries for _, _, vals in e.aggs for v in vals)
    assert any(isinstance(v, float) and v == 1e308 for e in got.entries for _, _, vals in e.aggs for v in vals)
    from flatten.fast import native_available

    if native_available():
        s = fast._partners["acme"].fused.__self__.stats()
        assert got.python_envelope < 120 and s["values_events"] == len(msgs) - 1 - got.python_envelope
        assert s["values_declined"] == 0


def test_aggregate_values_path_is_used_and_falls_back_when_the_native_side_declines():
    from flatten.fast import native_available

    if not native_available():
        pytest.skip("the accelerator is not built")
    c = _values_contract()
    msgs = _values_messages(200)
    bp = BatchProcessor(c)
    acme, plain = bp._partners["acme"], bp._partners["plain"]
    assert acme.want and acme.fused_args == (*acme.paths, acme.want) and plain.fused_args == plain.paths
    acme.run = None  # the per-event call, spied on below (the native run loop: the next test)
    lens = []
    real = acme.fused

    def spy(*a):
        out = real(*a)
        if out is not None:
            lens.append(len(out))
        return out

    acme.fused = spy
    res = bp.process(msgs, NOW)
    assert lens and set(lens) == {5}
    assert real.__self__.stats()["values_events"] == len(lens)
    # a native answer without values (None): the main row is loaded here instead, same entries
    acme.fused = lambda *a: None if (o := real(*a)) is None else (*o[:4], None)
    again = bp.process(msgs, NOW)
    assert [_strict(e.aggs) for e in again.entries] == [_strict(e.aggs) for e in res.entries]
    assert normalized(c, res)[2] == reference(c, msgs)[2]
    # a partner without aggregates asks for nothing: the 4-tuple as before
    assert len(plain.fused(b'{"id": "p1", "u": "u", "t": "2026-11-01T00:00:00Z"}', *plain.fused_args)) == 4


# ------------------------------------------------------------------ the native loop over a run of messages

def _outcome(c, res):
    """Everything a batch's result holds, exact types and float bits included (rows' columns as stored)."""
    rows, dead, entries = normalized(c, res)
    return (rows, [type(r) for r in res.rows], dead, entries,
            [(type(e), e.event_id, e.event_time_us, _strict(e.aggs), e.rows) for e in res.entries],
            res.python_envelope, res.python_flatten, res.key_missing)


class _Name(str):
    """A column name the native side declines to decode values for (not exactly a str): the main row is loaded
    in Python instead (the run loop's third way out)."""


@pytest.mark.parametrize("keep_rows", [False, True])
@pytest.mark.parametrize("which", ["acme", "values", "values-declined"])
def test_the_native_run_loop_equals_the_per_event_loop(which, keep_rows):
    """``process_run`` (one native call for a run of a partner's messages) gives what the Python loop over the
    per-event native call gives, message for message: rows, dead letters, entries (exact values), counters and
    the accelerator's own statistics (a decline counted once); on mixed partners, unknown partners, hostile
    payloads, declines in the middle of a run and events whose values the native side cannot decode."""
    from flatten.fast import native_available

    if not native_available():
        pytest.skip("the accelerator is not built")
    c = contract() if which == "acme" else _values_contract()
    msgs = messages() if which == "acme" else _values_messages(300)
    codes = []
    rng = random.Random(5)
    rng.shuffle(msgs)  # partners interleaved: the run stops at every change of partner
    for batch in (1, 37, len(msgs)):
        fast, slow = BatchProcessor(c, keep_rows=keep_rows), BatchProcessor(c, keep_rows=keep_rows)
        calls = []
        for pc in fast._partners.values():
            if pc.run is not None:
                real = pc.run
                pc.run = lambda *a, _r=real: calls.append(a[1]) or codes.append(_r(*a)) or codes[-1]
        for pc in slow._partners.values():
            pc.run = None
        if which == "values-declined":
            for bp in (fast, slow):
                pc = bp._partners["acme"]
                want = tuple(_Name(w) for w in pc.want)
                pc.fused_args = (*pc.paths, want)
                pc.run_args = (pc.paths, want, *pc.run_args[2:])
        for i in range(0, len(msgs), batch):
            part = msgs[i:i + batch]
            assert _outcome(c, fast.process(part, NOW)) == _outcome(c, slow.process(part, NOW))
        assert calls  # the run loop was taken, and left by every way out
        assert {r[2] for r in codes} == ({0, 1, 2} if which == "values-declined" else {0, 1})
        for name, pc in fast._partners.items():
            if pc.fused is not None:
                assert pc.fused.__self__.stats() == slow._partners[name].fused.__self__.stats()
