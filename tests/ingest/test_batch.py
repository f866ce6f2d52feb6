"""BatchProcessor (one call per batch) equals ParseEnvelope + FlattenEvents (one call per record and step)."""
from __future__ import annotations

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

NOW = 1_790_000_000_000_000
ACME_AGG = {"name": "activity", "windows": ["lifetime", "7d"],
            "metrics": [{"name": "n", "fn": "count"}, {"name": "spend", "fn": "sum", "column": "transaction__amount"},
                        {"name": "ch", "fn": "latest", "column": "event__channel"}]}


def contract():
    return parse_contract({
        "warehouse": {"kind": "duckdb", "path": "unused.duckdb"},
        "masking": {"key_env": "HW_TEST_BATCH_KEY", "allow_dev_key": True},
        "partners": [
            {"name": "acme", "sources": [{"kind": "file", "pattern": "unused/*.jsonl"}],
             "envelope": {"event_id": "event.id", "user_id": "customer.id", "event_time": "event.occurred_at",
                          "max_nesting": 20, "max_payload_bytes": 20_000},
             "flatten": {"max_depth": 4, "timestamp_columns": ["event__occurred_at"]},
             "columns": [{"path": "customer.email", "pii": "tokenize"}, {"path": "customer.ssn", "pii": "hash"},
                         {"path": "customer.name", "pii": "drop"},
                         {"path": "accounts[].number", "pii": "redact", "keep_last": 4}],
             "table": {"name": "acme_events"},
             "aggregates": [ACME_AGG, {**ACME_AGG, "name": "by_merchant", "key": "transaction__merchant__id"}]},
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
