"""The `headwater` command as a user runs it (subprocesses, real files, real DuckDB)."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "headwater.yaml"


def hw(*args, cwd=None, timeout=600):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_validate_ok_and_errors_name_partner_and_field(tmp_path):
    # the example's file patterns are relative to the working directory: give them files
    for sub, name in [("acme_bank", "a.jsonl.gz"), ("orbit_offers", "b.jsonl"), ("nimbus_pay", "c.avro")]:
        d = tmp_path / "headwater-demo" / "data" / sub
        d.mkdir(parents=True)
        (d / name).write_bytes(b"")
    r = hw("validate", "--config", str(EXAMPLE), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "OK (3 partners, batch" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("partition_granularity: HOUR", "partition_granularity: HOURLY"))
    r = hw("validate", "--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert "partner 'nimbus_pay': table.partition_granularity" in r.stderr
    assert "Traceback" not in r.stderr


def test_flatten_preview_survives_a_hostile_file_and_masks(tmp_path):
    f = tmp_path / "sample.jsonl.gz"
    good = {"event": {"id": "e1", "occurred_at": "2026-05-01T10:00:00Z", "type": "login"},
            "customer": {"id": "c1", "ssn": "111-22-3333", "email": "a@b.c", "name": "Ann"},
            "accounts": [{"number": "GB00112233", "type": "checking"}]}
    lines = [orjson.dumps(good), b"{not json", b"\xff\xfe\x00", b"[]", b"", b'{"a":' * 200 + b"1" + b"}" * 200,
             orjson.dumps({**good, "event": {"id": "e2", "occurred_at": "nope"}})]
    with gzip.open(f, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    r = hw("flatten", str(f), "--config", str(EXAMPLE), "--partner", "acme_bank")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "acme_events__accounts" in out and "customer__email" in out
    assert "111-22-3333" not in out and "a@b.c" not in out and "Ann" not in out and "GB00112233" not in out
    for reason in ("malformed_json", "bad_utf8", "not_an_object", "too_deep", "bad_event_time", "empty_line"):
        assert f"DEAD LETTER {reason}" in out, reason
    assert "1 events flattened, 6 dead letters" in out  # every line accounted for (the blank one too)


def test_flatten_preview_without_contract(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"a": {"b": [1, 2], "c": [{"d": 1}]}}\n{oops\n')
    r = hw("flatten", str(f))
    assert r.returncode == 0, r.stderr
    assert "a__b" in r.stdout and "events__a__c" in r.stdout and "DEAD LETTER malformed_json" in r.stdout


def test_demo_end_to_end_in_a_clean_directory(tmp_path):
    r = hw("demo", "--events", "300", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "-> OK" in r.stdout
    con = duckdb.connect(str(tmp_path / "headwater.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM acme_events").fetchone()[0] == 300
        reasons = {r[0] for r in con.execute("SELECT DISTINCT reason FROM dead_letters").fetchall()}
        assert {"malformed_json", "not_an_object", "bad_utf8", "missing_user_id", "bad_event_time",
                "too_deep", "too_large", "type_conflict"} <= reasons
        assert con.execute("SELECT count(DISTINCT key) FROM aggregates WHERE partner = 'acme_bank'").fetchone()[0] > 50
        # the second chunk's new attribute became a column, with no code or config change
        cols = {c[0] for c in con.execute("DESCRIBE acme_events").fetchall()}
        assert "transaction__loyalty_points" in cols
    finally:
        con.close()
    r2 = hw("schema", "--config", str(EXAMPLE), "--partner", "acme_bank", cwd=tmp_path)
    assert r2.returncode == 0 and "transaction__loyalty_points" in r2.stdout, r2.stdout + r2.stderr
