"""Raw PII never leaves ParseEnvelope: scan every warehouse table, the dead letters and the captured logs."""
import logging

import apache_beam as beam
import duckdb
import orjson
from apache_beam.testing.test_pipeline import TestPipeline

from flatten.records import RawMessage
from ingest.contract import parse_contract
from ingest.pipeline import build

SECRETS = {
    "ssn": "123-45-6789",
    "email": "jane.doe@example.org",
    "pan": "4000123412341234",
    "phone": "+1-202-555-0143",
    "name": "Jane Q Doe",
}


def contract(tmp_path, mode="freeze"):
    return parse_contract({
        "warehouse": {"kind": "duckdb", "path": str(tmp_path / "wh.duckdb")},
        "partners": [{
            "name": "acme",
            "sources": [{"kind": "file", "pattern": "unused/*.jsonl"}],
            "envelope": {"event_id": "id", "user_id": "user.email", "event_time": "ts"},
            "flatten": {"schema_mode": mode},
            "columns": [{"path": "user.ssn", "pii": "hash"}, {"path": "user.email", "pii": "tokenize"},
                        {"path": "cards[].pan", "pii": "redact"}, {"path": "user.*.phone", "pii": "redact", "keep_last": 2},
                        {"path": "user.name", "pii": "drop"}],
            "table": {"name": "acme_events"},
            "aggregates": [{"name": "per_user", "windows": ["lifetime"],
                            "metrics": [{"name": "n", "fn": "count"}, {"name": "amt", "fn": "avg", "column": "amount"}]}],
        }],
    })


def ev(i, **over):
    e = {"id": f"e{i}", "ts": "2026-02-01T00:00:00Z", "amount": 10 + i,
         "user": {"email": SECRETS["email"], "ssn": SECRETS["ssn"], "name": SECRETS["name"],
                  "home": {"phone": SECRETS["phone"]}},
         "cards": [{"pan": SECRETS["pan"], "exp": "12/29"}]}
    e.update(over)
    return orjson.dumps(e)


def test_no_raw_pii_in_tables_dead_letters_or_logs(tmp_path, caplog, capfd):
    good = [ev(i) for i in range(5)]
    failing = [
        ev(10, ts="not a time"),  # parsed, then dead-lettered: stored masked
        ev(11, amount="lots"),  # type conflict under freeze in the warehouse, and an aggregate type error
        ev(12)[:-5],  # malformed JSON: cannot be field-masked -> stored encrypted
        ev(13) + b"\xff",  # bad UTF-8
        orjson.dumps({"id": "e14", "ts": "2026-02-01T00:00:00Z", "user": {"ssn": SECRETS["ssn"]}}),  # no user id
    ]
    caplog.set_level(logging.DEBUG)
    msgs = [RawMessage("acme", "file", f"file:t:{n}", p, b"{}", 0) for n, p in enumerate(good + failing, 1)]
    with TestPipeline(runner="FnApiRunner") as p:
        build(p, contract(tmp_path), source_overrides={"Read_acme_file_0": beam.Create(msgs)}, require_overrides=True)
    con = duckdb.connect(str(tmp_path / "wh.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM acme_events").fetchone()[0] == 5
        assert con.execute("SELECT count(*) FROM dead_letters WHERE source <> 'aggregate'").fetchone()[0] == 5
        dumps = []
        for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            for row in con.execute(f'SELECT * FROM "{t}"').fetchall():
                for v in row:
                    dumps.append(v.decode("latin-1") if isinstance(v, (bytes, bytearray)) else str(v))
        # tokenized user ids still join: one token for the one email
        assert con.execute("SELECT count(DISTINCT _user_id) FROM acme_events").fetchone()[0] == 1
        assert con.execute("SELECT min(_user_id) FROM acme_events").fetchone()[0].startswith("tok_")
        assert "user__name" not in {r[0] for r in con.execute("DESCRIBE acme_events").fetchall()}
        assert con.execute("SELECT min(user__home__phone) FROM acme_events").fetchone()[0].endswith("43")
    finally:
        con.close()
    out, err = capfd.readouterr()
    haystacks = {"warehouse": "\n".join(dumps), "logs": caplog.text, "stdout": out, "stderr": err}
    assert len(haystacks["warehouse"]) > 1000
    for where, text in haystacks.items():
        for what, secret in SECRETS.items():
            assert secret not in text, f"raw {what} found in {where}"
            assert secret.encode().hex() not in text, f"hex of raw {what} found in {where}"


DRIFT_SSN, DRIFT_PAN = "987-65-4321", "4111111111111111"


def drift_contract(tmp_path):
    return parse_contract({
        "warehouse": {"kind": "duckdb", "path": str(tmp_path / "drift.duckdb")},
        "masking": {"allow_dev_key": True},
        "partners": [{
            "name": "acme",
            "sources": [{"kind": "file", "pattern": "unused/*.jsonl"}],
            "columns": [{"path": "user.ssn", "pii": "hash"}, {"path": "accounts[].number", "pii": "redact"}],
            "table": {"name": "acme_events"},
        }],
    })


def test_drifted_shapes_leave_no_raw_value_anywhere(tmp_path, caplog, capfd):
    """The issue-14 payloads: an object where the contract says list, literal dotted keys, lists of lists,
    a bad event time that *is* the SSN, a payload that is only the SSN; also when the user id is missing."""
    base = {"id": "e", "timestamp": "2026-02-01T00:00:00Z", "user": {"id": "u1"}}
    docs = [
        {"accounts": {"number": DRIFT_PAN}},
        {"user.ssn": DRIFT_SSN, "accounts.number": DRIFT_PAN},
        {"accounts": [[{"number": DRIFT_PAN}]], "user": {"id": "u1", "ssn": [DRIFT_SSN]}},
        {"user_ssn": DRIFT_SSN, "accounts__number": [DRIFT_PAN]},
    ]
    payloads = [orjson.dumps({**base, **d, "id": f"e{i}"}) for i, d in enumerate(docs)]
    payloads += [orjson.dumps({k: v for k, v in {**base, **d, "id": f"m{i}"}.items() if k != "user" or "user" in d}
                              | ({"user": {"ssn": DRIFT_SSN}} if "user" not in d else {})) for i, d in enumerate(docs)]
    payloads += [orjson.dumps({**base, "id": "t1", "timestamp": "555-12-3456", "user.ssn": DRIFT_SSN}),
                 orjson.dumps(DRIFT_SSN), orjson.dumps({**base, "id": "x", "accounts": {"number": DRIFT_PAN}})[:-3]]
    caplog.set_level(logging.DEBUG)
    msgs = [RawMessage("acme", "file", f"file:t:{n}", p, b"{}", 0) for n, p in enumerate(payloads, 1)]
    with TestPipeline(runner="FnApiRunner") as p:
        build(p, drift_contract(tmp_path), source_overrides={"Read_acme_file_0": beam.Create(msgs)},
              require_overrides=True)
    con = duckdb.connect(str(tmp_path / "drift.duckdb"), read_only=True)
    try:
        dumps = []
        for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            for row in con.execute(f'SELECT * FROM "{t}"').fetchall():
                dumps.extend(v.decode("latin-1") if isinstance(v, (bytes, bytearray)) else str(v) for v in row)
        assert con.execute("SELECT count(*) FROM acme_events").fetchone()[0] == 5  # docs[2] keeps its user id
        refs = [r[0] for r in con.execute("SELECT payload_ref FROM dead_letters").fetchall()]
        assert len(refs) == len(payloads) - 5 and all(r.startswith("hmac-sha256:") for r in refs)
        msgs_ = [r[0] for r in con.execute("SELECT message FROM dead_letters").fetchall()]
        # the event time is not annotated (stored as sent in the masked payload) but never quoted in a message
        assert "event time at 'timestamp' is not ISO-8601" in msgs_ and not any("555-12" in m for m in msgs_)
    finally:
        con.close()
    out, err = capfd.readouterr()
    for where, text in {"warehouse": "\n".join(dumps), "logs": caplog.text, "stdout": out, "stderr": err}.items():
        for secret in (DRIFT_SSN, DRIFT_PAN, DRIFT_SSN.replace("-", "")):
            assert secret not in text, f"raw value found in {where}"
            assert secret.encode().hex() not in text, f"hex of raw value found in {where}"
