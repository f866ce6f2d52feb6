"""``headwater replay`` after a contract fix turns dead letters into rows, masking exactly once.

The first contract reads the user id at the wrong path (every event -> ``missing_user_id``, the
stored payload already masked) and a nesting limit too low for some events (``too_deep``, stored
*encrypted* because the partner has annotations). After the fix, a replay produces exactly the rows
a fresh run of the fixed contract produces: the tokenized e-mail equals the fresh run's token (not
a token of a token), decrypted payloads are masked once. Malformed lines stay dead letters. A
second replay inserts nothing.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import orjson
import yaml

from backfill.replay import replay
from ingest.contract import load_contract
from ingest.pipeline import run
from sinks.duckdb_store import open_readonly

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_772_323_200


def _config(tmp: Path, name: str, user_id: str, max_nesting: int) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "warehouse": {"kind": "duckdb", "path": str(tmp / f"{name}.duckdb")},
        "masking": {"allow_dev_key": True},
        "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": str(tmp / "data" / "*.jsonl")}],
                      "envelope": {"event_id": "id", "user_id": user_id, "event_time": "ts",
                                   "max_nesting": max_nesting},
                      "columns": [{"path": "profile.email", "pii": "tokenize"}, {"path": "card", "pii": "redact"}],
                      "table": {"name": "acme_events"}}]}))
    return path


def _rows(db: Path) -> list:
    con = open_readonly(str(db))
    try:
        return [con.execute(f'SELECT * FROM "{t}" ORDER BY _row_id').fetchall()
                for t in ("acme_events", "acme_events__items")]
    finally:
        con.close()


def test_replay_after_contract_fix(tmp_path):
    (tmp_path / "data").mkdir()
    lines = []
    for i in range(60):
        ev = {"id": f"e{i:03d}", "ts": (T0 + i * 60) * 1000, "profile": {"uid": f"u{i % 6}", "email": f"p{i}@ex.com"},
              "card": "4111111111111111", "items": [{"sku": f"s{i % 4}"}]}
        if i % 12 == 5:
            ev["deep"] = {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}  # nests deeper than the first contract allows
        lines.append(orjson.dumps(ev))
    lines += [b'{"id": "bad1", "ts": 1', b"not json at all"]
    (tmp_path / "data" / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    broken = _config(tmp_path, "live", "user.id", 6)
    run(load_contract(broken), [])
    con = open_readonly(str(tmp_path / "live.duckdb"))
    try:
        by_reason = dict(con.execute("SELECT reason, count(*) FROM dead_letters GROUP BY 1").fetchall())
        enc = con.execute("SELECT count(*) FROM dead_letters WHERE starts_with(CAST(payload AS VARCHAR), 'enc:v1:')"
                          ).fetchone()[0]
        clear = con.execute("SELECT count(*) FROM dead_letters WHERE reason = 'missing_user_id' AND "
                            "CAST(payload AS VARCHAR) LIKE '%p1@ex.com%'").fetchone()[0]
    finally:
        con.close()
    assert by_reason == {"missing_user_id": 55, "too_deep": 5, "malformed_json": 2}, by_reason
    assert enc == 7 and clear == 0  # too_deep + malformed are encrypted; the others are stored masked

    # the fix: the right user id path, a higher nesting limit; the live config file is edited in place
    fixed_yaml = _config(tmp_path, "live", "profile.uid", 64)
    out = io.StringIO()
    assert replay(load_contract(fixed_yaml), partner="acme", replay_id="fix_uid", out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert "62 dead letters match, 60 replayable, 2 not" in text, text
    assert "60 records in = 60 rows + 0 dead letters + 0 duplicates + 0 out of range -> OK" in text, text

    reference = _config(tmp_path, "reference", "profile.uid", 64)
    run(load_contract(reference), [])
    assert _rows(tmp_path / "live.duckdb") == _rows(tmp_path / "reference.duckdb")
    con = open_readonly(str(tmp_path / "live.duckdb"))
    try:
        marks = con.execute("SELECT replay_id, result, count(*) FROM _headwater_replays GROUP BY 1, 2").fetchall()
    finally:
        con.close()
    assert marks == [("fix_uid", "row", 60)]

    # replaying again (through the CLI) inserts nothing twice
    before = _rows(tmp_path / "live.duckdb")
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "replay", "--config", str(fixed_yaml), "--reason",
                        "missing_user_id"], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "0 dead letters match" in r.stdout, r.stdout + r.stderr
    assert _rows(tmp_path / "live.duckdb") == before
