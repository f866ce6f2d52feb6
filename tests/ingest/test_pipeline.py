"""The whole unified pipeline with TestPipeline, into a real DuckDB file."""
import gzip
import json

import apache_beam as beam
import duckdb
import fastavro
import orjson
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from flatten.records import RawMessage
from ingest.contract import parse_contract
from ingest.pipeline import build

SSN = "987-65-4321"


def contract_for(tmp_path, pattern=None, schema_mode="evolve", aggregates=True):
    src = {"kind": "file", "pattern": pattern or str(tmp_path / "in" / "*.jsonl")}
    return parse_contract({
        "warehouse": {"kind": "duckdb", "path": str(tmp_path / "wh.duckdb")},
        "partners": [{
            "name": "acme",
            "sources": [src],
            "envelope": {"event_id": "id", "user_id": "user.id", "event_time": "ts", "max_nesting": 20,
                         "max_payload_bytes": 10_000},
            "flatten": {"schema_mode": schema_mode},
            "columns": [{"path": "user.ssn", "pii": "hash"}, {"path": "cards[].pan", "pii": "redact"}],
            "table": {"name": "acme_events", "clustering": ["_user_id"]},
            "aggregates": [{"name": "activity", "windows": ["lifetime"], "emit_every": "60s",
                            "metrics": [{"name": "n", "fn": "count"}, {"name": "spend", "fn": "sum", "column": "amount"}]}]
            if aggregates else [],
        }],
    })


def event(i, user="u1", **extra):
    ev = {"id": f"e{i}", "ts": f"2026-03-0{1 + i % 5}T10:00:00Z", "user": {"id": user, "ssn": SSN},
          "amount": i * 1.5, "cards": [{"pan": "4111111111111111", "brand": "visa"}], "meta": {"src": {"app": "web"}}}
    ev.update(extra)
    return orjson.dumps(ev)


HOSTILE = [
    b'{"id": "x", ',  # malformed
    b'[1]',  # not an object
    b'{"id": "bad", "user": {"id": "\xc3\x28"}}',  # bad UTF-8
    orjson.dumps({"id": "nouser", "ts": "2026-03-01T00:00:00Z", "user": {"ssn": SSN}}),  # missing user id
    orjson.dumps({"id": "badtime", "ts": "soon", "user": {"id": "u1", "ssn": SSN}}),  # bad time
    orjson.dumps({"id": "deep", "ts": "2026-03-01T00:00:00Z", "user": {"id": "u1"}, "d": json.loads('{"a":' * 30 + "1" + "}" * 30)}),
    orjson.dumps({"id": "big", "ts": "2026-03-01T00:00:00Z", "user": {"id": "u1"}, "blob": "x" * 20_000}),
]


def run(contract, messages):
    with TestPipeline(runner="FnApiRunner") as p:
        build(p, contract, source_overrides={"Read_acme_file_0": beam.Create(messages)}, require_overrides=True)


def msgs(payloads):
    return [RawMessage("acme", "file", f"file:test:{n}", pl, b"{}", 0) for n, pl in enumerate(payloads, 1)]


def query(path, sql):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_end_to_end_rows_dead_letters_aggregates_and_reconciliation(tmp_path):
    c = contract_for(tmp_path)
    good = [event(i, user=f"u{i % 3}") for i in range(30)]
    inputs = good + HOSTILE + [good[0]]  # plus a redelivered duplicate
    run(c, msgs(inputs))
    db = tmp_path / "wh.duckdb"
    rows = query(db, "SELECT count(*), count(DISTINCT _event_id) FROM acme_events")[0]
    assert rows == (30, 30)
    assert query(db, "SELECT count(*) FROM acme_events__cards")[0][0] == 30
    reasons = dict(query(db, "SELECT reason, count(*) FROM dead_letters GROUP BY 1"))
    assert reasons == {"malformed_json": 1, "not_an_object": 1, "bad_utf8": 1, "missing_user_id": 1,
                       "bad_event_time": 1, "too_deep": 1, "too_large": 1}
    # events in = rows + dead letters + duplicates
    assert len(inputs) == rows[0] + sum(reasons.values()) + 1
    # every dead letter says where it came from, what and which step
    for coords, step, msg in query(db, "SELECT coords, step, message FROM dead_letters"):
        assert coords.startswith("file:test:") and step and msg
    # masking: no raw SSN or card number anywhere in the warehouse
    for (t,) in query(db, "SELECT table_name FROM information_schema.tables"):
        dump = str(query(db, f'SELECT * FROM "{t}"'))
        assert SSN not in dump and "4111111111111111" not in dump, t
    # partition column and nested flattening
    cols = {r[0] for r in query(db, "DESCRIBE acme_events")}
    assert {"_row_id", "_partition", "_event_time", "_user_id", "meta__src__app", "user__ssn"} <= cols
    assert query(db, "SELECT count(DISTINCT _partition) FROM acme_events")[0][0] == 5
    # aggregates: final lifetime count per user equals the input
    final = dict(query(db, """SELECT key, CAST(json_extract(metrics, '$.n') AS INT) FROM aggregates
                               WHERE "window" = 'lifetime' QUALIFY row_number() OVER (PARTITION BY key ORDER BY version DESC) = 1"""))
    assert final == {"u0": 10, "u1": 10, "u2": 10}


def test_rerun_is_idempotent(tmp_path):
    c = contract_for(tmp_path, aggregates=False)
    payloads = [event(i) for i in range(12)] + HOSTILE[:2]
    run(c, msgs(payloads))
    run(c, msgs(payloads))
    db = tmp_path / "wh.duckdb"
    assert query(db, "SELECT count(*) FROM acme_events")[0][0] == 12
    assert query(db, "SELECT count(*) FROM dead_letters")[0][0] == 2


def test_schema_evolution_and_freeze(tmp_path):
    c = contract_for(tmp_path, aggregates=False)
    run(c, msgs([event(1)]))
    run(c, msgs([event(2, loyalty={"tier": "gold"})]))
    db = tmp_path / "wh.duckdb"
    assert "loyalty__tier" in {r[0] for r in query(db, "DESCRIBE acme_events")}
    versions = query(db, "SELECT max(version) FROM _headwater_schemas WHERE table_name = 'acme_events'")[0][0]
    assert versions >= 2
    frozen = contract_for(tmp_path / "f", schema_mode="freeze", aggregates=False)
    (tmp_path / "f").mkdir()
    run(frozen, msgs([event(1), event(2, amount="lots")]))
    fdb = tmp_path / "f" / "wh.duckdb"
    assert query(fdb, "SELECT count(*) FROM acme_events")[0][0] == 1
    (msg,) = query(fdb, "SELECT message FROM dead_letters WHERE reason = 'type_conflict'")[0]
    assert "amount" in msg and "FLOAT64" in msg and "STRING" in msg


def test_file_sources_jsonl_gzip_avro_and_corrupt_files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"\n".join(event(i) for i in range(5)) + b"\n\n" + HOSTILE[0] + b"\n")
    with gzip.open(d / "b.jsonl.gz", "wb") as fh:
        fh.write(b"\n".join(event(i) for i in range(5, 10)))  # no trailing newline
    schema = {"type": "record", "name": "E", "fields": [
        {"name": "id", "type": "string"}, {"name": "ts", "type": "long"},
        {"name": "user", "type": {"type": "record", "name": "U", "fields": [{"name": "id", "type": "string"}]}}]}
    with open(d / "c.avro", "wb") as fh:
        fastavro.writer(fh, schema, [{"id": f"av{i}", "ts": 1772359200 + i, "user": {"id": "u9"}} for i in range(4)])
    (d / "d.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip")
    c = contract_for(tmp_path, pattern=str(d / "*"), aggregates=False)
    with TestPipeline(runner="FnApiRunner") as p:
        build(p, c)
    db = tmp_path / "wh.duckdb"
    assert query(db, "SELECT count(*) FROM acme_events")[0][0] == 14
    reasons = dict(query(db, "SELECT reason, count(*) FROM dead_letters GROUP BY 1"))
    assert reasons == {"malformed_json": 1, "bad_file": 1, "empty_line": 1}
    assert query(db, "SELECT coords FROM dead_letters WHERE reason = 'empty_line'")[0][0].endswith("a.jsonl:6")
    assert query(db, "SELECT coords FROM dead_letters WHERE reason = 'bad_file'")[0][0].endswith("d.jsonl.gz")


def test_integers_beyond_int64_keep_their_digits(tmp_path):
    """2**70 is NUMERIC (DECIMAL(38,9) here, NUMERIC in BigQuery), exact; beyond NUMERIC's 29 digits a STRING."""
    c = contract_for(tmp_path, aggregates=False)
    payloads = [json.dumps({"id": f"b{i}", "ts": "2026-03-01T10:00:00Z", "user": {"id": "u1"}, "big": v,
                            "bigs": [v, 1], "nested": {"n": v}}).encode()
                for i, v in enumerate([2**70, -(2**70), 2**64, 10**30 + 7])]
    run(c, msgs(payloads))
    db = tmp_path / "wh.duckdb"
    got = dict(query(db, "SELECT _event_id, CAST(big AS VARCHAR) FROM acme_events WHERE _event_id < 'b3'"))
    assert {k: int(v.split(".")[0]) for k, v in got.items()} == {"b0": 2**70, "b1": -(2**70), "b2": 2**64}
    types = dict(query(db, "SELECT column_name, data_type FROM information_schema.columns "
                           "WHERE table_name = 'acme_events'"))
    assert types["big"].startswith("DECIMAL") and types["nested__n"].startswith("DECIMAL")
    assert int(query(db, "SELECT CAST(nested__n AS VARCHAR) FROM acme_events WHERE _event_id = 'b0'")[0][0]
               .split(".")[0]) == 2**70
    # beyond 10^29: kept as decimal text (evolve mode: the variant column of the NUMERIC column)
    row = query(db, "SELECT * FROM acme_events WHERE _event_id = 'b3'")
    assert str(10**30 + 7) in str(row)
