"""Every bounded run ends with the reconciliation: ``headwater run`` on a batch contract included."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_run_on_a_batch_contract_prints_the_reconciliation(tmp_path):
    lines = [orjson.dumps({"id": f"e{i}", "timestamp": 1_772_323_200 + i, "user": {"id": f"u{i % 3}"}})
             for i in range(40)]
    lines += [lines[3], lines[7], b"{broken", orjson.dumps({"id": "nouser", "timestamp": 1_772_323_200})]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"warehouse": {"kind": "duckdb", "path": str(tmp_path / "wh.duckdb")},
                                   "partners": [{"name": "acme", "sources": [{"kind": "file",
                                                                              "pattern": str(tmp_path / "*.jsonl")}],
                                                 "table": {"name": "acme_events"}}]}))
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "run", "--config", str(cfg)], cwd=ROOT,
                       env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Reconciliation: 44 records in = 40 rows + 2 dead letters + 2 duplicates + 0 out of range -> OK" \
        in r.stdout, r.stdout
