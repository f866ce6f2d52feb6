"""The three backfill modes on the embedded DuckDB warehouse (the same semantics as the BigQuery MERGEs).

1,000 events over 5 days are first written by the ordinary pipeline (what the stream writes);
then ``fill`` over an overlapping range inserts nothing, ``columns`` sets a new attribute on all
1,000 rows and nothing else, ``replace`` of 2 DAY partitions makes them (main and child table)
exactly the changed history while every other row stays as it was. Each apply is one transaction.
"""
from __future__ import annotations

import gzip
import io

import duckdb
import orjson

from backfill.runner import run_backfill
from backfill.spec import BackfillSpec, parse_instant_us
from ingest.contract import parse_contract
from ingest.pipeline import run
from sinks.duckdb_store import open_readonly

DAY_US = 86_400_000_000
D1 = parse_instant_us("2026-03-01", "t")


def _event(i: int, **extra) -> dict:
    day, k = divmod(i, 200)
    return {"id": f"ev{i:04d}", "timestamp": f"2026-03-0{day + 1}T{k % 24:02d}:{k % 60:02d}:00Z",
            "user": {"id": f"u{i % 20}"}, "amount": i, "items": [{"sku": f"s{i % 7}"}, {"sku": f"s{i % 5}"}], **extra}


def _write(root, name: str, events: list[dict], per_chunk: int = 100) -> str:
    d = root / name
    d.mkdir()
    for k in range(0, len(events), per_chunk):
        with gzip.open(d / f"part-{k // per_chunk:02d}.jsonl.gz", "wb") as fh:
            fh.write(b"".join(orjson.dumps(e) + b"\n" for e in events[k:k + per_chunk]))
    return str(d / "*.jsonl.gz")


def _q(db, sql: str) -> list:
    con = open_readonly(str(db))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_fill_columns_replace_on_duckdb(tmp_path):
    db = tmp_path / "wh.duckdb"
    events = [_event(i) for i in range(1000)]
    v1 = _write(tmp_path, "v1", events)
    live = parse_contract({"warehouse": {"kind": "duckdb", "path": str(db)},
                           "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": v1}],
                                         "table": {"name": "acme_events"}}]})
    run(live, [])
    count = "SELECT count(*), count(DISTINCT _row_id) FROM %s"
    assert _q(db, count % "acme_events") == [(1000, 1000)]
    assert _q(db, count % "acme_events__items") == [(2000, 2000)]

    # fill over an overlapping range: nothing new
    out = io.StringIO()
    spec = BackfillSpec(partner="acme", patterns=(v1,), start_us=D1 + DAY_US, end_us=D1 + 4 * DAY_US,
                        backfill_id="fill1", wave_chunks=3)
    assert run_backfill(live, spec, out=out, err=io.StringIO()) == 0, out.getvalue()
    assert "1,000 records in = 600 rows + 0 dead letters + 0 duplicates + 400 out of range -> OK" in out.getvalue()
    assert _q(db, count % "acme_events") == [(1000, 1000)]
    assert _q(db, count % "acme_events__items") == [(2000, 2000)]

    # columns: only loyalty_tier changes, on every row; the schema gains a version
    before = _q(db, "SELECT * FROM acme_events ORDER BY _row_id")
    v2 = _write(tmp_path, "v2", [_event(i, loyalty_tier=f"tier{i % 3}", extra="not set") for i in range(1000)])
    out = io.StringIO()
    cspec = BackfillSpec(partner="acme", patterns=(v2,), mode="columns", columns=("loyalty_tier",), backfill_id="tiers")
    assert run_backfill(live, cspec, out=out, err=io.StringIO()) == 0, out.getvalue()
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [d[0] for d in con.execute("SELECT * FROM acme_events LIMIT 0").description]
        after = con.execute("SELECT * FROM acme_events ORDER BY _row_id").fetchall()
    finally:
        con.close()
    assert "loyalty_tier" in names and "extra" not in names  # only the named column is added
    tier = names.index("loyalty_tier")
    assert [r[:tier] + r[tier + 1:] for r in after] == before
    assert all(r[tier] == f"tier{int(r[names.index('_event_id')][2:]) % 3}" for r in after)
    assert "acme_events                              staged     1,000  inserted         0  updated     1,000" \
        in out.getvalue()

    # replace Mar 2 and Mar 3 by changed history: every 4th event gone, amounts changed
    changed = [dict(e, amount=e["amount"] + 10_000) for i, e in enumerate(events[200:600]) if i % 4]
    v3 = _write(tmp_path, "v3", changed)
    outside = "_event_time < TIMESTAMP '2026-03-02' OR _event_time >= TIMESTAMP '2026-03-04'"
    main_out = _q(db, f"SELECT * FROM acme_events WHERE {outside} ORDER BY _row_id")
    child_out = _q(db, f"SELECT * FROM acme_events__items WHERE {outside} ORDER BY _row_id")
    out = io.StringIO()
    rspec = BackfillSpec(partner="acme", patterns=(v3,), mode="replace", start_us=D1 + DAY_US, end_us=D1 + 3 * DAY_US,
                         backfill_id="fix_days")
    assert run_backfill(live, rspec, out=out, err=io.StringIO()) == 0, out.getvalue()
    assert _q(db, f"SELECT * FROM acme_events WHERE {outside} ORDER BY _row_id") == main_out
    assert _q(db, f"SELECT * FROM acme_events__items WHERE {outside} ORDER BY _row_id") == child_out
    inside = _q(db, f"SELECT _event_id, amount, loyalty_tier FROM acme_events WHERE NOT ({outside}) ORDER BY 1")
    assert inside == [(e["id"], e["amount"], None) for e in changed]
    assert _q(db, f"SELECT count(*) FROM acme_events__items WHERE NOT ({outside})") == [(2 * len(changed),)]
    assert _q(db, count % "acme_events") == [(900, 900)]
    assert "deleted       100" in out.getvalue() and "updated       300" in out.getvalue(), out.getvalue()
    assert _q(db, "SELECT kind, count(*) FROM _headwater_backfills WHERE kind = 'apply' GROUP BY 1") == [("apply", 3)]


def test_history_is_reconciled_against_the_live_schema(tmp_path):
    """Staging starts with the live schemas: a history whose first values have another type than the
    stream saw gets the same columns and values as if the stream had written it after the live rows."""
    live_events = [{"id": f"a{i}", "timestamp": f"2026-03-01T10:{i:02d}:00Z", "user": {"id": "u"}, "amount": i}
                   for i in range(10)]
    history = [{"id": f"b{i}", "timestamp": f"2026-03-02T10:{i:02d}:00Z", "user": {"id": "u"}, "amount": i + 0.5,
                "code": str(i)} for i in range(10)]
    a, b = _write(tmp_path, "a", live_events), _write(tmp_path, "b", history)

    def contract(db, pattern):
        return parse_contract({"warehouse": {"kind": "duckdb", "path": str(tmp_path / db)},
                               "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": pattern}],
                                             "table": {"name": "acme_events"}}]})

    run(contract("ref.duckdb", a), [])
    run(contract("ref.duckdb", b), [])  # the stream writing the history after the live rows
    run(contract("live.duckdb", a), [])
    out = io.StringIO()
    assert run_backfill(contract("live.duckdb", a), BackfillSpec(partner="acme", patterns=(b,), backfill_id="hist"),
                        out=out, err=io.StringIO()) == 0, out.getvalue()

    def table(db):
        con = open_readonly(str(tmp_path / db))
        try:
            cur = con.execute("SELECT * FROM acme_events ORDER BY _row_id")
            return [d[0] for d in cur.description], cur.fetchall()
        finally:
            con.close()

    assert table("live.duckdb") == table("ref.duckdb")


def test_avro_and_jsonl_chunks_in_one_backfill(tmp_path):
    import fastavro

    from backfill.planner import build_plan

    schema = fastavro.parse_schema({"type": "record", "name": "E", "fields": [
        {"name": "id", "type": "string"}, {"name": "timestamp", "type": "string"},
        {"name": "user", "type": {"type": "record", "name": "U", "fields": [{"name": "id", "type": "string"}]}},
        {"name": "amount", "type": "long"}]})
    d = tmp_path / "mixed"
    d.mkdir()
    for k in range(3):
        with open(d / f"part-{k}.avro", "wb") as fh:
            fastavro.writer(fh, schema, [{"id": f"a{k}_{i}", "timestamp": f"2026-03-0{k + 1}T10:{i:02d}:00Z",
                                          "user": {"id": "u"}, "amount": i} for i in range(30)])
        with gzip.open(d / f"part-{k}.jsonl.gz", "wb") as fh:
            fh.write(b"".join(orjson.dumps({"id": f"j{k}_{i}", "timestamp": f"2026-03-0{k + 1}T11:{i:02d}:00Z",
                                            "user": {"id": "u"}, "amount": i}) + b"\n" for i in range(20)))
    db = tmp_path / "wh.duckdb"
    live = parse_contract({"warehouse": {"kind": "duckdb", "path": str(db)},
                           "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": str(d / "*")}],
                                         "table": {"name": "acme_events"}}]})
    spec = BackfillSpec(partner="acme", patterns=(str(d / "*.avro"), str(d / "*.jsonl.gz")), backfill_id="mixed",
                        start_us=D1 + DAY_US, wave_chunks=4)
    plan = build_plan(live, spec, sample=6)
    assert plan["chunks"]["count"] == 6 and plan["sample"]["records"] == 150 and plan["sample"]["in_range"] == 100
    out = io.StringIO()
    assert run_backfill(live, spec, out=out, err=io.StringIO()) == 0, out.getvalue()
    assert "150 records in = 100 rows + 0 dead letters + 0 duplicates + 50 out of range -> OK" in out.getvalue()
    assert _q(db, "SELECT count(*), count(DISTINCT _row_id), min(_event_id), max(_event_id) FROM acme_events") == \
        [(100, 100, "a1_0", "j2_9")]
