"""`headwater verify`: an exact warehouse passes (exit 0); planted drift is found and named (exit 1).

The warehouse is written by the real pipeline (tests/sinks/test_warehouse_reader.py builds it: variant
columns, a sink-rejected row, HyperLogLog distinct counts, a column-keyed aggregate), then tampered with
the way drift happens: a metric changed, an aggregate row deleted, an event row the aggregates never
saw, an aggregate row without events.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

from deploy.cli import main
from deploy.verify import parse_since, verify
from ingest.contract import parse_contract
from sinks.bq_client import make_client
from tests.conftest import plant_metric_drift, plant_unseen_event
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)
from tests.sinks.test_warehouse_reader import events, raw_contract, write_warehouse

ROOT = Path(__file__).resolve().parents[2]


def _setup(tmp_path, warehouse: dict):
    raw = raw_contract(warehouse)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    contract = parse_contract(raw)
    write_warehouse(contract, events())
    return contract, str(cfg)


def _verify(capsys, *args) -> tuple[int, str, str]:
    code = main(["verify", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    contract, cfg = _setup(tmp, {"kind": "duckdb", "path": str(tmp / "wh.duckdb")})
    return tmp, contract, cfg


def _copy(built, tmp_path):
    """A private copy of the module's warehouse and a contract pointing at it."""
    src_tmp, _, cfg = built
    db = tmp_path / "wh.duckdb"
    db.write_bytes((src_tmp / "wh.duckdb").read_bytes())
    raw = yaml.safe_load(Path(cfg).read_text())
    raw["warehouse"]["path"] = str(db)
    new = tmp_path / "c.yaml"
    new.write_text(yaml.safe_dump(raw))
    return db, str(new)


def test_exact_warehouse_passes_as_a_user_runs_it(built):
    _, _, cfg = built
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "verify", "--config", cfg], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "evo/activity: 13 keys: 13 match, 0 differ, 0 missing, 0 extra" in r.stdout
    assert "frz/per_shop: 6 keys: 6 match" in r.stdout  # shop ids 0..5
    assert r.stdout.rstrip().endswith("verify: OK, 4 aggregates equal the recomputation from the rows")
    assert "Traceback" not in r.stderr


def test_json_partner_and_since(built, capsys):
    _, contract, cfg = built
    code, out, _ = _verify(capsys, "--config", cfg, "--json", "--partner", "frz")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True
    assert [(a["partner"], a["aggregate"]) for a in doc["aggregates"]] == [("frz", "activity"), ("frz", "per_shop")]
    assert doc["aggregates"][0]["match"] == 13 and doc["aggregates"][0]["windows_checked"] == 26
    # --since: only keys with an event at or after T
    since = parse_since("2026-03-09T18:00:00Z")
    rep = verify(contract, "evo", since)
    want = len({e["user"]["id"] for e in events() if e["ts"] >= "2026-03-09T18:00:00"})
    assert rep.ok and rep.aggregates[0].match == want and 0 < want < 13
    code, _, err = _verify(capsys, "--config", cfg, "--partner", "nobody")
    assert code == 2 and "nobody" in err
    code, _, err = _verify(capsys, "--config", cfg, "--since", "yesterday-ish")
    assert code == 2 and "--since" in err and "Traceback" not in err


def test_planted_drift_is_found_and_named(built, tmp_path, capsys):
    db, cfg = _copy(built, tmp_path)
    con = duckdb.connect(str(db))
    # 1. a changed metric in u3's latest lifetime row of evo/activity
    m = plant_metric_drift(con, "evo", "activity", "u3", "n", 2)
    # 2. every aggregate row of u5 deleted
    con.execute("DELETE FROM aggregates WHERE partner='evo' AND aggregate='activity' AND key='u5'")
    # 3. an event row the aggregates never saw (u7), copied from one of u7's rows with a new id
    plant_unseen_event(con, "evo_events", "u7")  # event e72, shop 0
    # 4. an aggregate row for a key that has no events
    con.execute("INSERT INTO aggregates SELECT * REPLACE ('ghost' AS key) FROM aggregates "
                "WHERE partner='evo' AND aggregate='activity' AND key='u8'")
    con.close()
    code, out, err = _verify(capsys, "--config", cfg)
    assert code == 1, out + err
    assert "evo/activity: 14 keys: 10 match, 2 differ, 1 missing, 1 extra" in out
    assert f"key 'u3' window lifetime metric n: expected {m['n'] - 2}, found {m['n']}" in out
    assert "missing (events but no aggregate row): 'u5'" in out
    assert "extra (aggregate rows without events): 'ghost'" in out
    assert "key 'u7' window lifetime metric n:" in out
    assert "evo/per_shop: 6 keys: 5 match, 1 differ" in out and "key '0' window lifetime metric n:" in out
    assert "frz/activity: 13 keys: 13 match" in out and "frz/per_shop: 6 keys: 6 match" in out
    assert out.rstrip().endswith("verify: DRIFT in 2 of 4 aggregates")
    code, out, _ = _verify(capsys, "--config", cfg, "--json")
    doc = json.loads(out)
    act = next(a for a in doc["aggregates"] if (a["partner"], a["aggregate"]) == ("evo", "activity"))
    assert code == 1 and not doc["ok"] and act["differ"] == 2
    assert {"key": "u3", "window": "lifetime", "metric": "n", "expected": m["n"] - 2, "found": m["n"]} in \
        act["largest_differences"]


def test_a_changed_hll_estimate_is_drift(built, tmp_path, capsys):
    """HyperLogLog values are recomputed with the same registers: off by one is drift, not noise."""
    db, cfg = _copy(built, tmp_path)
    con = duckdb.connect(str(db))
    key = con.execute(
        "SELECT key FROM aggregates WHERE partner='evo' AND aggregate='activity' "
        "AND \"window\"='lifetime' AND CAST(json_extract(metrics, '$.days') AS INT) > 5 "
        "ORDER BY version DESC LIMIT 1").fetchone()[0]
    m = plant_metric_drift(con, "evo", "activity", key, "days", 1)
    con.close()
    code, out, _ = _verify(capsys, "--config", cfg, "--partner", "evo")
    assert code == 1 and f"key {key!r} window lifetime metric days: expected {m['days'] - 1}, found {m['days']}" in out


def test_missing_warehouse_is_a_usage_error(tmp_path, capsys):
    raw = raw_contract({"kind": "duckdb", "path": str(tmp_path / "none.duckdb")})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code, _, err = _verify(capsys, "--config", str(cfg))
    assert code == 2 and "none.duckdb" in err and "does not exist" in err


@pytest.mark.integration
def test_bigquery_emulator_exact_then_drift(cloud_services, tmp_path, capsys):
    wh = {"kind": "bigquery", "project": "headwater-local", "dataset": unique_id("verify"),
          "endpoint": cloud_services.bigquery,
          "bigquery": {"max_attempts": 2, "initial_backoff_s": 0.05, "request_timeout_s": 60}}
    contract, cfg = _setup(tmp_path, wh)
    code, out, err = _verify(capsys, "--config", cfg)
    assert code == 0, out + err
    assert "evo/activity: 13 keys: 13 match, 0 differ, 0 missing, 0 extra" in out
    # an event row streamed in behind the aggregates' back
    client = make_client(contract.warehouse)
    ref = f"{wh['project']}.{wh['dataset']}.evo_events"
    rows = [dict(r) for r in client.query(f"SELECT * FROM `{ref}` WHERE _user_id = 'u2' LIMIT 1").result()]
    row = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in rows[0].items()}
    row.update({"_row_id": "planted", "_event_id": "planted"})
    row = {k: (str(v) if k == "big" and v is not None else v) for k, v in row.items()}
    assert client.insert_rows_json(ref, [row], row_ids=["planted"]) == []
    code, out, _ = _verify(capsys, "--config", cfg, "--partner", "evo")
    assert code == 1 and "key 'u2' window lifetime metric n:" in out, out
