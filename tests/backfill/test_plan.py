"""Chunk listing (local, fake-gcs-server, moto) and ``headwater backfill plan``: lazy, one pass, writes nothing."""
from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import orjson
import pytest
import yaml

from backfill.chunks import iter_chunks
from backfill.planner import partitions
from backfill.spec import BackfillSpec, parse_instant_us
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)
from tests.ingest.test_objectstore import upload_gcs, upload_s3

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_772_323_200  # 2026-03-01


def _chunk(k: int, n: int = 20) -> bytes:
    return gzip.compress(b"".join(orjson.dumps({"id": f"e{k}_{i}", "timestamp": T0 + k * 3600 + i,
                                                "user": {"id": "u"}}) + b"\n" for i in range(n)))


def test_local_listing_is_lazy_sorted_and_uses_beam_glob_syntax(tmp_path):
    for d in ("a", "b/c"):
        (tmp_path / d).mkdir(parents=True)
    for name in ("a/2.jsonl", "a/1.jsonl", "a/x.avro", "b/c/3.jsonl", "top.jsonl"):
        (tmp_path / name).write_bytes(b"{}\n")
    it = iter_chunks([str(tmp_path / "a" / "*.jsonl")])
    assert isinstance(it, types.GeneratorType)
    assert [Path(c.uri).name for c in it] == ["1.jsonl", "2.jsonl"]
    deep = [Path(c.uri).relative_to(tmp_path).as_posix() for c in iter_chunks([str(tmp_path / "**.jsonl")])]
    assert deep == ["a/1.jsonl", "a/2.jsonl", "b/c/3.jsonl", "top.jsonl"]
    one = list(iter_chunks([str(tmp_path / "top.jsonl")]))
    assert len(one) == 1 and one[0].size == 3 and one[0].generation.endswith("-3")


def test_spec_errors_name_the_flag():
    with pytest.raises(ValueError, match="--from/--to: mode 'replace' needs both"):
        BackfillSpec(partner="acme", patterns=("x",), mode="replace")
    with pytest.raises(ValueError, match="--columns: mode 'columns' needs"):
        BackfillSpec(partner="acme", patterns=("x",), mode="columns")
    with pytest.raises(ValueError, match="--to: must be after --from"):
        BackfillSpec(partner="acme", patterns=("x",), start_us=2, end_us=1)
    with pytest.raises(ValueError, match="--id"):
        BackfillSpec(partner="acme", patterns=("x",), backfill_id="Bad-Id")
    with pytest.raises(ValueError, match="--from"):
        parse_instant_us("yesterday", "--from")
    assert partitions(parse_instant_us("2026-03-01", "f"), parse_instant_us("2026-04-01", "t"), "DAY") == \
        (31, "2026-03-01", "2026-03-31")
    assert partitions(parse_instant_us("2026-01-15", "f"), parse_instant_us("2026-03-02", "t"), "MONTH") == \
        (3, "2026-01", "2026-03")


@pytest.mark.integration
def test_object_store_listing_crosses_pages_and_plan_writes_nothing(cloud_services, tmp_path, monkeypatch):
    for k, v in cloud_services.env().items():
        monkeypatch.setenv(k, v)
    gb, sb = unique_id("hwlg").replace("_", "-"), unique_id("hwls").replace("_", "-")
    n = 1_050  # more than one listing page (1,000) on both stores
    upload_gcs(cloud_services.gcs, gb, {f"h/part-{k:05d}.jsonl.gz": _chunk(k) for k in range(n)}
               | {"h/notes.txt": b"x", "other/part-0.jsonl.gz": _chunk(0)})
    upload_s3(cloud_services.s3, sb, {f"h/part-{k:05d}.jsonl.gz": _chunk(k) for k in range(n)})
    for store, bucket in (("gs", gb), ("s3", sb)):
        it = iter_chunks([f"{store}://{bucket}/h/*.jsonl.gz"])
        first = list(itertools.islice(it, 3))
        assert [c.uri.rsplit("/", 1)[1] for c in first] == ["part-00000.jsonl.gz", "part-00001.jsonl.gz",
                                                          "part-00002.jsonl.gz"]
        rest = list(it)
        assert len(first) + len(rest) == n and rest[-1].uri.endswith(f"part-{n - 1:05d}.jsonl.gz")
        assert all(c.generation for c in rest) and len({c.uri for c in rest}) == len(rest)

    cfg = tmp_path / "c.yaml"
    db = tmp_path / "wh.duckdb"
    cfg.write_text(yaml.safe_dump({"warehouse": {"kind": "duckdb", "path": str(db)},
                                   "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": "unused"}],
                                                 "table": {"name": "acme_events"}}]}))
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "backfill", "plan", "--config", str(cfg), "--partner",
                        "acme", "--source", f"gs://{gb}/h/*.jsonl.gz", "--source", f"s3://{sb}/h/*.jsonl.gz",
                        "--from", "2026-03-02", "--to", "2026-03-10", "--mode", "replace", "--json", "--first", "2"],
                       cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["chunks"]["count"] == 2 * n and len(plan["chunks"]["first"]) == 2
    assert plan["chunks"]["bytes"] == 2 * sum(len(_chunk(k)) for k in range(n))
    assert plan["partitions"] == {"granularity": "DAY", "count": 8, "first": "2026-03-02", "last": "2026-03-09",
                                  "from_sample": False}
    assert 0.8 * 2 * n * 20 <= plan["estimate"]["events"] <= 1.2 * 2 * n * 20
    assert "Partitions outside the range are untouched" in plan["effect"]
    assert not db.exists(), "plan wrote nothing"

    r = subprocess.run([sys.executable, "-m", "deploy.cli", "backfill", "plan", "--config", str(cfg), "--partner",
                        "acme", "--source", f"gs://{gb}/h/*.jsonl.gz", "--mode", "replace"],
                       cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--from/--to: mode 'replace' needs both" in r.stderr, r.stderr


def test_replace_needs_partition_boundaries(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"warehouse": {"kind": "duckdb", "path": str(tmp_path / "wh.duckdb")},
                                   "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": "x"}],
                                                 "table": {"name": "acme_events", "partition_granularity": "DAY"}}]}))
    (tmp_path / "a.jsonl").write_bytes(b"{}\n")
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "backfill", "run", "--config", str(cfg), "--partner", "acme",
                        "--source", str(tmp_path / "*.jsonl"), "--mode", "replace", "--from", "2026-03-01T12:00:00Z",
                        "--to", "2026-03-03", "--id", "x1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--from: 2026-03-01T12:00:00Z is not the start of a DAY partition of acme_events" in r.stderr
    assert not (tmp_path / "wh.duckdb").exists()
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "backfill", "run", "--config", str(cfg), "--partner", "acme",
                        "--source", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--id", "x2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "quote --source globs" in r.stderr, r.stderr
