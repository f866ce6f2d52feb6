"""``headwater audit``: a clean warehouse passes; planted raw values are found where they are, never echoed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import duckdb
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline

from deploy.audit import audit, default_pattern
from flatten.records import RawMessage
from ingest.contract import load_contract
from ingest.pipeline import build
from tests.conftest_cloud import cloud_services  # noqa: F401  (fixture)
from tests.ingest.test_pii_nowhere import SECRETS, ev

ROOT = Path(__file__).resolve().parents[2]


def write_contract(tmp_path, **warehouse):
    doc = {
        "warehouse": {"kind": "duckdb", "path": str(tmp_path / "wh.duckdb"), **warehouse},
        "partners": [{
            "name": "acme",
            "sources": [{"kind": "file", "pattern": str(tmp_path / "in" / "*.jsonl")}],
            "envelope": {"event_id": "id", "user_id": "user.email", "event_time": "ts"},
            "columns": [{"path": "user.ssn", "pii": "hash"}, {"path": "user.email", "pii": "tokenize"},
                        {"path": "cards[].pan", "pii": "redact"}, {"path": "user.*.phone", "pii": "redact"},
                        {"path": "user.name", "pii": "drop"},
                        {"path": "member_code", "pii": "hash", "pattern": r"\bMC-\d{6}\b"}],
            "table": {"name": "acme_events"},
        }],
    }
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def fill(tmp_path):
    path = write_contract(tmp_path)
    c = load_contract(str(path))
    payloads = [ev(i, member_code="MC-123456") for i in range(4)] + [ev(9, ts="soon"), ev(10)[:-4]]
    msgs = [RawMessage("acme", "file", f"file:t:{n}", p, b"{}", 0) for n, p in enumerate(payloads, 1)]
    with TestPipeline(runner="FnApiRunner") as p:
        build(p, c, source_overrides={"Read_acme_file_0": beam.Create(msgs)}, require_overrides=True)
    return path, c


def hw(*args):
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)


def test_default_patterns_by_name():
    assert default_pattern("user.ssn")[0] == "ssn" and default_pattern("contact.e-mail")[0] == "email"
    assert default_pattern("cards[].pan")[0] == "card" and default_pattern("user.*.phone")[0] == "phone"
    assert default_pattern("user.name") is None


def test_clean_warehouse_passes_and_planted_values_are_found(tmp_path):
    path, c = fill(tmp_path)
    log = tmp_path / "job.log"
    log.write_text("INFO started\nINFO wrote 4 rows\n")
    r = hw("audit", "--config", str(path), "--log", str(log))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CLEAN" in r.stdout

    con = duckdb.connect(str(tmp_path / "wh.duckdb"))
    try:
        con.execute("ALTER TABLE acme_events ADD COLUMN note VARCHAR")
        # a raw SSN in its own column (column + pattern), a raw email in an unannotated column (pattern)
        con.execute("UPDATE acme_events SET user__ssn = ?, note = ? WHERE _event_id = 'e0'",
                    [SECRETS["ssn"], f"contact {SECRETS['email']} please"])
        con.execute("UPDATE acme_events__cards SET pan = ? WHERE _index = 0 AND _event_id = 'e1'", [SECRETS["pan"]])
        con.execute("UPDATE acme_events SET member_code = 'MC-654321' WHERE _event_id = 'e2'")  # contract pattern
        con.execute("UPDATE dead_letters SET message = message || ' ' || ? WHERE reason = 'bad_event_time'",
                    [SECRETS["ssn"]])
    finally:
        con.close()
    log.write_text(f"INFO started\nDEBUG element {{'phone': '{SECRETS['phone']}'}}\n")
    r = hw("audit", "--config", str(path), "--log", str(log), "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    got = {(h["location"], h["check"]) for h in rep["hits"]}
    assert {("acme_events.user__ssn", "column:hash"), ("acme_events.user__ssn", "pattern:ssn"),
            ("acme_events.note", "pattern:email"), ("acme_events__cards.pan", "column:redact"),
            ("acme_events__cards.pan", "pattern:card"), ("acme_events.member_code", "column:hash"),
            ("acme_events.member_code", "pattern:custom"), ("dead_letters.message", "pattern:ssn"),
            (str(log), "pattern:phone")} == got
    assert not rep["clean"] and rep["tables"] >= 4 and rep["log_lines"] == 2
    for secret in (*SECRETS.values(), "MC-654321"):
        assert secret not in r.stdout and secret not in r.stderr  # the audit never echoes what it finds
    human = hw("audit", "--config", str(path), "--sample", "100")
    assert human.returncode == 1 and "HITS" in human.stdout and "acme_events.user__ssn" in human.stdout


def test_bad_pattern_fails_at_launch_naming_the_field(tmp_path):
    path = write_contract(tmp_path)
    text = path.read_text().replace(r"\bMC-\d{6}\b", "MC-(")
    path.write_text(text)
    r = hw("audit", "--config", str(path))
    assert r.returncode == 2 and "pattern" in r.stderr and "acme" in r.stderr, r.stderr


def test_dropped_column_with_values_is_a_hit(tmp_path):
    path, c = fill(tmp_path)
    con = duckdb.connect(str(tmp_path / "wh.duckdb"))
    try:
        con.execute("ALTER TABLE acme_events ADD COLUMN user__name VARCHAR")
        con.execute("UPDATE acme_events SET user__name = 'x' WHERE _event_id = 'e3'")
    finally:
        con.close()
    rep = audit(load_contract(str(path)))
    assert [(h.location, h.row, h.check) for h in rep.hits] == [("acme_events.user__name", "e3", "column:drop")]


@pytest.mark.integration
def test_audit_bigquery_emulator(tmp_path, cloud_services):
    """The same scan over a BigQuery dataset (bqemulator): clean after the pipeline, a planted raw value found."""
    from google.cloud import bigquery

    from sinks.bq_client import make_client
    from tests.conftest_cloud import unique_id

    dataset = unique_id("hw_audit")
    path = write_contract(tmp_path, kind="bigquery", project="headwater-local", dataset=dataset,
                          endpoint=cloud_services.bigquery,
                          bigquery={"max_attempts": 2, "initial_backoff_s": 0.05, "max_backoff_s": 0.2})
    c = load_contract(str(path))
    msgs = [RawMessage("acme", "file", f"file:t:{n}", ev(n), b"{}", 0) for n in range(3)]
    with TestPipeline(runner="FnApiRunner") as p:
        build(p, c, source_overrides={"Read_acme_file_0": beam.Create(msgs)}, require_overrides=True)
    rep = audit(c)
    assert rep.hits == [] and rep.rows >= 6, rep
    client = make_client(c.warehouse)
    client.insert_rows_json(f"headwater-local.{dataset}.acme_events",
                            [{"_row_id": "planted", "_event_time": "2026-02-01T00:00:00Z", "user__ssn": SECRETS["ssn"]}],
                            retry=None)
    rep = audit(c, sample=1000)
    assert {(h.location, h.row, h.check) for h in rep.hits} == {
        ("acme_events.user__ssn", "planted", "column:hash"), ("acme_events.user__ssn", "planted", "pattern:ssn")}
    assert isinstance(client, bigquery.Client)
