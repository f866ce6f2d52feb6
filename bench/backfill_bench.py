"""Backfill throughput, memory and plan time, beside dlt and a bare Beam read+parse (a figure, not a test).

    python bench/backfill_bench.py [--events 1000000] [--chunks 100] [--wave-chunks 10,100] [--skip dlt]

Writes N realistic events (~0.5 KB, nested, an array of objects, an e-mail to tokenize) as
gzipped JSONL chunks, then runs each contender in its own process (peak RSS per process,
``ru_maxrss``) over the same files:

* ``plan``: ``headwater backfill plan`` (listing + 3 sampled chunks), seconds;
* ``backfill``: ``headwater backfill run`` into a fresh DuckDB file, mode fill, one figure per wave size;
* ``run``: ``headwater run`` of the same files straight into DuckDB (the pipeline without staging and apply);
* ``dlt``: dlt loading the same records into DuckDB (its normalizer makes child tables too; no masking);
* ``beam_read_parse``: Beam's ReadFromText + orjson.loads on the same runner, nothing written (the floor).

Prints events/s, peak RSS and each contender's ratio to the bare Beam read+parse.
"""
from __future__ import annotations

import argparse
import gzip
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_772_323_200  # 2026-03-01


def generate(root: Path, events: int, chunks: int) -> int:
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(11)
    per = (events + chunks - 1) // chunks
    total = 0
    for k in range(chunks):
        lines = []
        for i in range(k * per, min(events, (k + 1) * per)):
            lines.append(orjson.dumps({
                "id": f"ev{i:08d}", "timestamp": T0 + i * 7, "user": {"id": f"u{i % 5000}", "email": f"x{i % 997}@ex.com",
                                                                       "plan": rnd.choice(["free", "pro", "team"])},
                "amount": round(rnd.uniform(1, 500), 2), "currency": "EUR", "channel": rnd.choice(["web", "ios"]),
                "device": {"os": "linux", "app": {"version": f"3.{i % 40}.1", "build": i % 9000}},
                "items": [{"sku": f"s{rnd.randrange(800)}", "qty": rnd.randrange(1, 4), "price": 9.5}
                          for _ in range(rnd.randrange(1, 4))],
                "tags": ["a", "b"] if i % 3 else [], "note": "x" * rnd.randrange(20, 120)}))
        with gzip.open(root / f"part-{k:04d}.jsonl.gz", "wb", compresslevel=3) as fh:
            fh.write(b"\n".join(lines) + b"\n")
        total += len(lines)
    return total


def _config(workdir: Path, data: Path) -> Path:
    import yaml

    cfg = workdir / "bench.yaml"
    cfg.write_text(yaml.safe_dump({
        "warehouse": {"kind": "duckdb", "path": str(workdir / "backfill.duckdb")},
        "masking": {"allow_dev_key": True},
        "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": str(data / "*.jsonl.gz")}],
                      "columns": [{"path": "user.email", "pii": "tokenize"}],
                      "table": {"name": "acme_events"}}]}))
    return cfg


# -- contenders (each runs in a child process) -------------------------------------------------------
def child_plan(data: Path, workdir: Path, _arg: str) -> str:
    from backfill.planner import build_plan
    from backfill.spec import BackfillSpec
    from ingest.contract import load_contract

    t0 = time.perf_counter()
    plan = build_plan(load_contract(_config(workdir, data)), BackfillSpec(partner="acme",
                                                                         patterns=(str(data / "*.jsonl.gz"),)))
    return f"{time.perf_counter() - t0:.3f} {plan['chunks']['count']} {plan['estimate']['events']}"


def child_backfill(data: Path, workdir: Path, wave: str) -> str:
    import io

    from backfill.runner import run_backfill
    from backfill.spec import BackfillSpec
    from ingest.contract import load_contract

    for f in workdir.glob("backfill*.duckdb*"):
        f.unlink()
    out = io.StringIO()
    t0 = time.perf_counter()
    code = run_backfill(load_contract(_config(workdir, data)), BackfillSpec(
        partner="acme", patterns=(str(data / "*.jsonl.gz"),), backfill_id="bench", wave_chunks=int(wave)),
        out=out, err=io.StringIO())
    secs = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(out.getvalue())
    return f"{secs:.3f}"


def child_run(data: Path, workdir: Path, _arg: str) -> str:
    from ingest.contract import load_contract
    from ingest.pipeline import run

    for f in workdir.glob("backfill*.duckdb*"):
        f.unlink()
    t0 = time.perf_counter()
    run(load_contract(_config(workdir, data)), [])
    return f"{time.perf_counter() - t0:.3f}"


def child_dlt(data: Path, workdir: Path, _arg: str) -> str:
    import dlt

    def records():
        for f in sorted(data.glob("*.jsonl.gz")):
            with gzip.open(f, "rb") as fh:
                for line in fh:
                    if line.strip():
                        yield orjson.loads(line)

    os.environ["DATA_WRITER__DISABLE_COMPRESSION"] = "true"
    t0 = time.perf_counter()
    pipe = dlt.pipeline(pipeline_name="bench_backfill", destination=dlt.destinations.duckdb(str(workdir / "dlt.duckdb")),
                        dataset_name="acme", pipelines_dir=str(workdir / "dlt-pipelines"))
    pipe.run(records(), table_name="acme_events", write_disposition="append")
    return f"{time.perf_counter() - t0:.3f}"


def child_beam(data: Path, workdir: Path, _arg: str) -> str:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    t0 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        _ = (p | "Read" >> beam.io.ReadFromText(str(data / "*.jsonl.gz"))
             | "Parse" >> beam.Map(orjson.loads)
             | "Count" >> beam.combiners.Count.Globally())
    return f"{time.perf_counter() - t0:.3f}"


CHILDREN = {"plan": child_plan, "backfill": child_backfill, "run": child_run, "dlt": child_dlt, "beam_read_parse": child_beam}


def run_child(name: str, data: Path, workdir: Path, arg: str = "") -> tuple[str, float]:
    """(child's answer, its peak RSS in MB) of one contender in a fresh process (the local runner is in-process)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, __file__, "--_child", name, str(data), str(workdir), arg or "-"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err.decode()[-3000:]}")
    *answer, rss = out.decode().strip().splitlines()[-1].split()
    return " ".join(answer), float(rss)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--wave-chunks", default="10,100", help="backfill wave sizes to measure")
    ap.add_argument("--skip", default="", help="comma-separated contenders to skip (dlt, beam_read_parse)")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        name, data, workdir, arg = args._child
        sys.path.insert(0, str(ROOT))
        os.environ.setdefault("HEADWATER_MASK_KEY", "bench-key-0123456789abcdef0123456789")
        answer = CHILDREN[name](Path(data), Path(workdir), arg)
        import resource

        print(f"{answer} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")  # Linux: KB -> MB
        return 0
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="headwater-bfbench-") as d:
        work = Path(d)
        data = work / "history"
        t0 = time.perf_counter()
        n = generate(data, args.events, args.chunks)
        size = sum(f.stat().st_size for f in data.iterdir())
        print(f"{n:,} events in {args.chunks} gzipped JSONL chunks ({size / 1e6:,.1f} MB), "
              f"generated in {time.perf_counter() - t0:.1f}s")
        rows = []
        if "beam_read_parse" not in skip:
            out, rss = run_child("beam_read_parse", data, work)
            rows.append(("bare Beam read + orjson.loads (floor)", float(out), rss))
        base = rows[0][1] if rows else None
        ans, rss = run_child("plan", data, work)
        secs, chunks, est = ans.split()
        print(f"plan: {chunks} chunks listed and 3 sampled in {float(secs):.2f}s (peak RSS {rss:,.0f} MB), "
              f"estimated {int(est):,} events (actual {n:,}, {100 * int(est) / n - 100:+.1f} %)")
        for w in args.wave_chunks.split(","):
            out, rss = run_child("backfill", data, work, w)
            rows.append((f"headwater backfill run, {w} chunks per wave", float(out), rss))
        if "run" not in skip:
            out, rss = run_child("run", data, work)
            rows.append(("headwater run (same pipeline, no staging/apply)", float(out), rss))
        if "dlt" not in skip:
            out, rss = run_child("dlt", data, work)
            rows.append(("dlt -> DuckDB (normalize + load, no masking)", float(out), rss))
        print(f"\n{'contender':<48} {'seconds':>8} {'events/s':>10} {'peak RSS MB':>12} {'vs floor':>9}")
        for name, secs, rss in rows:
            ratio = f"{100 * base / secs:.0f} %" if base else "-"
            print(f"{name:<48} {secs:>8.1f} {n / secs:>10,.0f} {rss:>12,.0f} {ratio:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
