"""A backfill SIGKILLed mid-run and resumed with the same id equals an uninterrupted run; reruns change nothing.

``headwater backfill run`` runs as a subprocess over 20 chunks, one chunk per wave; once the
ledger shows at least 3 staged chunks the process is SIGKILLed (no handler runs). Rerunning the
same ``--id`` skips the staged chunks, stages the rest and applies: every table equals a
reference backfill run in one go with a different wave size, and the ledger is complete.
"""
from __future__ import annotations

import gzip
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import yaml

from backfill.runner import run_backfill
from backfill.spec import BackfillSpec, parse_instant_us
from ingest.contract import load_contract
from sinks.duckdb_store import open_readonly

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_772_323_200  # 2026-03-01T00:00:00Z


def _write_chunks(root: Path, n_chunks: int = 20, per_chunk: int = 30) -> None:
    root.mkdir()
    for k in range(n_chunks):
        lines = []
        for i in range(per_chunk):
            j = k * per_chunk + i
            ev = {"id": f"e{j:05d}", "ts": (T0 + j * 1200) * 1000, "user": {"id": f"u{j % 11}"}, "amount": j,
                  "tags": [{"t": f"x{j % 4}"}] * (j % 3)}
            if j % 17 == 0:
                del ev["user"]  # missing_user_id dead letter
            lines.append(orjson.dumps(ev))
        if k % 5 == 1:
            lines.append(lines[0])  # a duplicate inside a chunk
            lines.append(b"{broken")  # malformed_json
        with gzip.open(root / f"chunk-{k:03d}.jsonl.gz", "wb") as fh:
            fh.write(b"\n".join(lines) + b"\n")


def _config(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "warehouse": {"kind": "duckdb", "path": str(tmp / f"{name}.duckdb")},
        "masking": {"allow_dev_key": True},
        "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": str(tmp / "unused" / "*.gz")}],
                      "envelope": {"event_id": "id", "user_id": "user.id", "event_time": "ts"},
                      "table": {"name": "acme_events"}}]}))
    return path


def _dump(db: Path) -> dict:
    con = open_readonly(str(db))
    try:
        out = {}
        for t in ("acme_events", "acme_events__tags"):
            out[t] = con.execute(f'SELECT * FROM "{t}" ORDER BY _row_id').fetchall()
        out["dead_letters"] = con.execute("SELECT id, partner, coords, payload, reason, message FROM dead_letters "
                                          "ORDER BY id").fetchall()
        out["schemas"] = con.execute("SELECT table_name, version, schema_json FROM _headwater_schemas "
                                     "ORDER BY 1, 2").fetchall()
        return out
    finally:
        con.close()


def _ledger(db: Path, bid: str) -> dict:
    con = open_readonly(str(db))
    try:
        if not con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = '_headwater_backfills'").fetchall():
            return {}
        return dict(con.execute("SELECT kind, count(DISTINCT coalesce(uri, CAST(wave AS VARCHAR), kind)) "
                                "FROM _headwater_backfills WHERE backfill_id = ? GROUP BY kind", [bid]).fetchall())
    finally:
        con.close()


def _cli(config: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", "backfill", "run", "--config", str(config), "--partner", "acme",
            "--source", str(data / "*.jsonl.gz"), "--from", "2026-03-01T06:00:00Z", "--to", "2026-03-08",
            "--id", "resume_me", *extra]


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    data = tmp_path / "history"
    _write_chunks(data)
    # reference: one uninterrupted run, 5 chunks per wave
    ref_cfg = _config(tmp_path, "reference")
    spec = BackfillSpec(partner="acme", patterns=(str(data / "*.jsonl.gz"),), backfill_id="resume_me",
                        start_us=parse_instant_us("2026-03-01T06:00:00Z", "f"), end_us=parse_instant_us("2026-03-08", "t"),
                        wave_chunks=5)
    out = io.StringIO()
    assert run_backfill(load_contract(ref_cfg), spec, out=out, err=io.StringIO()) == 0, out.getvalue()
    assert "-> OK" in out.getvalue()

    # killed run: one chunk per wave, SIGKILL once >= 3 chunks are in the ledger
    cfg = _config(tmp_path, "killed")
    db = tmp_path / "killed.duckdb"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_cli(cfg, data, "--wave-chunks", "1"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        staged = 0
        while time.monotonic() < deadline and proc.poll() is None:
            staged = _ledger(db, "resume_me").get("chunk", 0) if db.exists() else 0
            if staged >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"backfill ended before it could be killed: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _ledger(db, "resume_me")
    assert 3 <= at_kill["chunk"] < 20 and "apply" not in at_kill, at_kill

    # resume with the same id
    done = subprocess.run(_cli(cfg, data, "--wave-chunks", "1"), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{at_kill['chunk']} already staged (skipped)" in done.stderr, done.stderr
    assert "-> OK" in done.stdout
    final = _ledger(db, "resume_me")
    assert final["chunk"] == 20 and final["apply"] == 1 and final["params"] == 1, final
    assert _dump(db) == _dump(tmp_path / "reference.duckdb")
    assert _dump(db)["acme_events"], "the backfill wrote rows"

    # the same backfill again: nothing changes
    before = _dump(db)
    again = subprocess.run(_cli(cfg, data), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already applied" in again.stdout, again.stdout + again.stderr
    assert _dump(db) == before
    assert not list(tmp_path.glob("*.backfill-*.duckdb")), "staging files are removed after the apply"


def test_sigterm_stops_cleanly_and_says_what_finished(tmp_path):
    data = tmp_path / "history"
    _write_chunks(data, n_chunks=8)
    cfg = _config(tmp_path, "stopped")
    db = tmp_path / "stopped.duckdb"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(_cli(cfg, data, "--wave-chunks", "1"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists() and _ledger(db, "resume_me").get("chunk", 0) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, out + err
    staged = _ledger(db, "resume_me")["chunk"]
    assert f"stopped by SIGTERM: {staged} chunks staged" in out, out + err
    assert "Rerun with --id resume_me to resume" in out and "Traceback" not in err, err
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"  # anything started for this run would name its config
    done = subprocess.run(_cli(cfg, data), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "-> OK" in done.stdout, done.stdout + done.stderr
    assert _ledger(db, "resume_me")["chunk"] == 8
