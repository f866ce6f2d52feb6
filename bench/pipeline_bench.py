"""Whole-job benchmark: headwater against bare Beam and dlt on the same generated files, in one run.

Not a test. Run::

    pip install -e '.[bench]'     # dlt (and pandas), only needed here
    python bench/pipeline_bench.py [--events 100000] [--users 2000] [--contenders all] [--rounds 1]

Generates N acme-style events once (``deploy.synth.acme_event``: nested, arrays, 5 PII annotations;
``--dup-rate`` of them repeated as exact duplicate lines, as a redelivering feed does) as gzipped
JSONL chunks of 10,000 lines, then runs every contender in its own subprocess on the same files:

* ``headwater``: ``ingest.pipeline.run`` on a contract with masking, dedup and one aggregate
  (count, sum, max, distinct, first/last seen, latest; windows lifetime/1d/7d/30d), DuckDB warehouse.
  The run must reconcile (records in = event rows + dead letters + duplicates) or the bench says so.
* ``headwater_noagg``: the same contract without the aggregate.
* ``beam_bare``: Beam's FnApiRunner: ``ReadFromText`` -> ``orjson.loads`` -> ``Count.Globally``
  (the floor of any Beam job reading these files).
* ``dlt``: what a user would pick instead: dlt reading the same JSONL (orjson per line) -> its
  relational normalizer -> DuckDB (``dlt.pipeline(destination="duckdb").run``).

Per contender: wall seconds, events/s, CPU-seconds (user + system of the subprocess and its children,
from ``getrusage(RUSAGE_CHILDREN)``) per million events, peak RSS (the larger of the subprocess's ``ru_maxrss`` and
the summed RSS of it and its own subprocesses, e.g. the fold worker, sampled every 0.25 s), and ratios vs dlt and vs bare Beam
measured in the same run. Finally the projected Dataflow cost of 100M events/day at headwater's
CPU-seconds per event, at the prices in ``DATAFLOW_PRICES`` (list prices, us-central1, quoted with
their source below; a vCPU-hour only: memory, storage, shuffle and Streaming Engine are extra).

The machine is shared: compare ratios measured in the same run, not absolute figures across runs.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

CHUNK = 10_000
CONTENDERS = ("headwater", "headwater_noagg", "beam_bare", "dlt")

#: USD per vCPU-hour, Dataflow list prices (us-central1), https://cloud.google.com/dataflow/pricing
#: (checked 2026-12; batch and streaming workers; FlexRS batch is cheaper). Memory ($0.003557 /
#: $0.0035557 per GB-hour), Shuffle / Streaming Engine data and disk are billed on top.
DATAFLOW_PRICES = {"streaming": 0.069, "batch": 0.056}
EVENTS_PER_DAY = 100_000_000

AGGREGATE = {
    "name": "customer_activity", "key": "user_id", "windows": ["lifetime", "1d", "7d", "30d"],
    "emit_every": "60s", "allowed_lateness": "1h", "ttl": "90d",
    "metrics": [
        {"name": "events", "fn": "count"},
        {"name": "spend", "fn": "sum", "column": "transaction__amount"},
        {"name": "max_spend", "fn": "max", "column": "transaction__amount"},
        {"name": "merchants", "fn": "distinct", "column": "transaction__merchant__id"},
        {"name": "first_seen", "fn": "first_seen"},
        {"name": "last_seen", "fn": "last_seen"},
        {"name": "last_channel", "fn": "latest", "column": "event__channel"},
    ],
}


def contract_dict(data: Path, db: Path, aggregates: bool) -> dict:
    return {
        "warehouse": {"kind": "duckdb", "path": str(db)},
        "masking": {"key_env": "HEADWATER_MASK_KEY"},
        "partners": [{
            "name": "acme_bank",
            "sources": [{"kind": "file", "pattern": str(data / "*.jsonl.gz")}],
            "envelope": {"event_id": "event.id", "user_id": "customer.id", "event_time": "event.occurred_at"},
            "flatten": {"max_depth": 6, "timestamp_columns": ["event__occurred_at"]},
            "columns": [{"path": "customer.email", "pii": "tokenize"}, {"path": "customer.ssn", "pii": "hash"},
                        {"path": "customer.name", "pii": "drop"},
                        {"path": "accounts[].number", "pii": "redact", "keep_last": 4},
                        {"path": "customer.*.phone", "pii": "redact", "keep_last": 2}],
            "table": {"name": "acme_events", "partition_column": "_event_time", "partition_granularity": "DAY"},
            "aggregates": [AGGREGATE] if aggregates else [],
        }],
    }


def generate(data: Path, n: int, users: int, dup_rate: float, seed: int = 7) -> int:
    """N events (+ duplicates) in gzipped JSONL chunks; returns the number of lines written."""
    from deploy import synth

    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    dup_rng = random.Random(seed + 1)
    lines = 0
    buf: list[bytes] = []
    k = 0

    def flush() -> None:
        nonlocal k, buf
        if buf:
            with gzip.open(data / f"chunk-{k:05d}.jsonl.gz", "wb", compresslevel=6) as fh:
                fh.write(b"\n".join(buf) + b"\n")
            k += 1
            buf = []

    for i in range(n):
        line = orjson.dumps(synth.acme_event(i, rng, users=users))
        buf.append(line)
        lines += 1
        if dup_rng.random() < dup_rate:
            buf.append(line)
            lines += 1
        if len(buf) >= CHUNK:
            flush()
    flush()
    return lines


# ---------------------------------------------------------------- contenders (run in a subprocess)


def _run_headwater(data: Path, work: Path, aggregates: bool, argv: list[str]) -> dict:
    from deploy.demo import summarize
    from ingest import pipeline, progress
    from ingest.contract import parse_contract

    db = work / ("hw.duckdb" if aggregates else "hw_noagg.duckdb")
    contract = parse_contract(contract_dict(data, db, aggregates))
    from apache_beam.metrics.metric import MetricsFilter

    progress.reset()
    t0 = time.perf_counter()
    result = pipeline.run(contract, argv)
    dt = time.perf_counter() - t0
    lines = int((data / "LINES").read_text())
    with open(os.devnull, "w") as null:
        fig = summarize(contract, inputs=lines, out=null)
    # duplicates from the job's metrics: progress counters only see this process (not other worker processes)
    dups = sum(c.committed or 0 for c in result.metrics().query(
        MetricsFilter().with_name("duplicate_events"))["counters"])
    ok = lines == fig["main_rows"] + fig["dead"] + dups
    return {"seconds": dt, "reconciled": ok, "rows": fig["main_rows"], "dead": fig["dead"], "duplicates": dups}


def _run_beam_bare(data: Path, work: Path, argv: list[str]) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    out = work / "beam_count"
    t0 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner", *argv])) as p:
        _ = (p | "Read" >> beam.io.ReadFromText(str(data / "*.jsonl.gz"))
             | "Parse" >> beam.Map(orjson.loads)
             | "Count" >> beam.combiners.Count.Globally()
             | "Write" >> beam.Map(lambda n: out.write_text(str(n))))
    return {"seconds": time.perf_counter() - t0, "rows": int(out.read_text())}


def _run_dlt(data: Path, work: Path) -> dict:
    import dlt

    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    os.environ["DLT_DATA_DIR"] = str(work / "dlt_data")
    os.environ["DLT_PROJECT_DIR"] = str(work / "dlt_project")

    @dlt.resource(name="acme_events", write_disposition="append")
    def events():
        for f in sorted(data.glob("*.jsonl.gz")):
            with gzip.open(f, "rb") as fh:
                for line in fh:
                    if line.strip():
                        yield orjson.loads(line)

    t0 = time.perf_counter()
    pipe = dlt.pipeline(pipeline_name="bench", destination=dlt.destinations.duckdb(str(work / "dlt.duckdb")),
                        dataset_name="bench", pipelines_dir=str(work / "dlt_pipelines"))
    pipe.run(events())
    dt = time.perf_counter() - t0
    import duckdb

    con = duckdb.connect(str(work / "dlt.duckdb"), read_only=True)
    rows = con.execute("SELECT count(*) FROM bench.acme_events").fetchone()[0]
    con.close()
    return {"seconds": dt, "rows": rows}


class _TreeRss:
    """Peak of the summed RSS of this process and every process under it (the bounded job's fold workers), sampled
    from /proc every ``interval_s``: ``ru_maxrss`` is one process's peak, and the job's footprint is the sum."""

    def __init__(self, interval_s: float = 0.25):
        import threading

        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    @staticmethod
    def _sample(root: int) -> int:
        parent, rss = {}, {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/status") as fh:
                    fields = dict(ln.split(":", 1) for ln in fh if ":" in ln)
            except OSError:
                continue
            parent[int(d)] = int(fields.get("PPid", "0").strip())
            rss[int(d)] = int(fields.get("VmRSS", "0 kB").split()[0])
        total, todo = 0, [root]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo += [c for c, pp in parent.items() if pp == pid]
        return total

    def _run(self, interval_s: float) -> None:
        me = os.getpid()
        while not self._stop.wait(interval_s):
            self.peak_kb = max(self.peak_kb, self._sample(me))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def child(args: argparse.Namespace) -> int:
    data, work = Path(args.data), Path(args.work)
    tree = _TreeRss() if os.path.isdir("/proc") else None
    extra = [a for a in (args.beam_args or "").split() if a]
    if args.contender == "headwater":
        res = _run_headwater(data, work, True, extra)
    elif args.contender == "headwater_noagg":
        res = _run_headwater(data, work, False, extra)
    elif args.contender == "beam_bare":
        res = _run_beam_bare(data, work, extra)
    elif args.contender == "dlt":
        res = _run_dlt(data, work)
    else:
        raise SystemExit(f"unknown contender {args.contender}")
    import resource

    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    res["maxrss_one_process_mb"] = rss / 1024  # Linux: kilobytes
    res["tree_rss_mb"] = tree.stop() if tree else 0.0
    res["maxrss_mb"] = max(rss / 1024, res["tree_rss_mb"])  # the job's footprint: every process of it at once
    print("RESULT " + json.dumps(res))
    return 0


# ---------------------------------------------------------------- parent


def measure(contender: str, data: Path, work: Path, beam_args: str, profile: str | None) -> dict:
    """Run one contender in a fresh subprocess. CPU time: the change in this process's RUSAGE_CHILDREN
    (user + system of the subprocess and everything it spawned); peak RSS: the subprocess's own
    ``ru_maxrss`` (and its children's) or, if larger, the peak of their summed RSS, which it reports when done."""
    import resource

    cmd = [sys.executable, __file__, "--child", contender, "--data", str(data), "--work", str(work),
           f"--beam-args={beam_args}"]
    if profile:
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        cmd = [spy if os.path.exists(spy) else "py-spy", "record", "-r", "50", "-o", f"{profile}-{contender}.svg",
               "--", *cmd]  # the CPU figures then include py-spy's own
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, cwd=str(work))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace")[-4000:])
        return {"contender": contender, "error": f"exit {proc.returncode}"}
    res = json.loads([ln for ln in proc.stdout.decode().splitlines() if ln.startswith("RESULT ")][-1][7:])
    res.update(contender=contender, wall=wall,
               cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--dup-rate", type=float, default=0.005, help="fraction of events repeated as a duplicate line")
    ap.add_argument("--contenders", default="all", help=f"comma list of {','.join(CONTENDERS)} or 'all'")
    ap.add_argument("--beam-args", default="", help="extra Beam options for the Beam contenders")
    ap.add_argument("--keep", help="directory to keep the generated files and outputs in")
    ap.add_argument("--profile", help="py-spy flame graphs to PREFIX-<contender>.svg")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HEADWATER_MASK_KEY", "bench-key-0123456789abcdef0123456789abcdef")
    if args.child:
        args.contender = args.child
        return child(args)
    names = CONTENDERS if args.contenders == "all" else tuple(args.contenders.split(","))
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hw-bench-"))
    data = base / "data"
    marker = data / "LINES"
    spec = f"{args.events}:{args.users}:{args.dup_rate}"
    if not (marker.exists() and (data / "SPEC").read_text() == spec):
        shutil.rmtree(data, ignore_errors=True)
        t0 = time.perf_counter()
        lines = generate(data, args.events, args.users, args.dup_rate)
        marker.write_text(str(lines))
        (data / "SPEC").write_text(spec)
        print(f"generated {args.events:,} events ({lines:,} lines, {args.users:,} users) in "
              f"{time.perf_counter() - t0:.1f}s under {data}", flush=True)
    lines = int(marker.read_text())
    mb = sum(f.stat().st_size for f in data.glob("*.gz")) / 1e6
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; {lines:,} lines, {mb:.1f} MB gzipped", flush=True)
    results = {}
    for name in names:
        work = base / f"work-{name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        res = measure(name, data, work, args.beam_args, args.profile)
        results[name] = res
        if "error" in res:
            print(f"  {name}: FAILED ({res['error']})", flush=True)
            continue
        extra = ""
        if "reconciled" in res:
            extra = f"  reconciled={'OK' if res['reconciled'] else 'MISMATCH'} rows={res['rows']:,} " \
                    f"dead={res['dead']:,} dups={res['duplicates']:,}"
        print(f"  {name:<16} {res['seconds']:7.1f}s  {lines / res['seconds']:>9,.0f} ev/s  "
              f"cpu {res['cpu_s']:6.1f}s  rss {res['maxrss_mb']:7.0f} MB{extra}", flush=True)
    report(results, lines)
    if args.json:
        Path(args.json).write_text(json.dumps({"lines": lines, "results": results}, indent=2))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if all("error" not in r and r.get("reconciled", True) for r in results.values()) else 1


def report(results: dict, lines: int) -> None:
    """Ratios by wall time (the issue's figure) and by CPU time (steadier when other jobs share the machine)."""
    ok = {k: v for k, v in results.items() if "error" not in v}
    rate = {k: lines / v["seconds"] for k, v in ok.items()}
    cpu_rate = {k: lines / v["cpu_s"] for k, v in ok.items() if v.get("cpu_s")}

    def ratio(d: dict, k: str, base: str, pct: bool = False) -> str:
        if base not in d or k not in d:
            return "-"
        return f"{d[k] / d[base]:.0%}" if pct else f"{d[k] / d[base]:.2f}x"

    print()
    print(f"{'contender':<16} {'events/s':>9} {'vs dlt':>7} {'vs beam':>8} {'ev/CPU-s':>9} {'vs dlt':>7} "
          f"{'vs beam':>8} {'CPU-s/M ev':>10} {'peak RSS MB':>11}")
    for k, v in ok.items():
        print(f"{k:<16} {rate[k]:>9,.0f} {ratio(rate, k, 'dlt'):>7} {ratio(rate, k, 'beam_bare', True):>8} "
              f"{cpu_rate.get(k, 0):>9,.0f} {ratio(cpu_rate, k, 'dlt'):>7} {ratio(cpu_rate, k, 'beam_bare', True):>8} "
              f"{v['cpu_s'] / lines * 1e6:>10,.0f} {v['maxrss_mb']:>11,.0f}")
    if "headwater" in ok:
        cpu_per_ev = ok["headwater"]["cpu_s"] / lines
        vcpu_h = cpu_per_ev * EVENTS_PER_DAY / 3600
        print(f"\nDataflow projection for {EVENTS_PER_DAY / 1e6:.0f}M events/day at headwater's "
              f"{cpu_per_ev * 1e6:,.0f} CPU-s per million events (100% vCPU use; real workers idle some):")
        for mode, price in DATAFLOW_PRICES.items():
            print(f"  {mode:<9} {vcpu_h:8.1f} vCPU-h/day x ${price}/vCPU-h = ${vcpu_h * price:8.2f}/day "
                  f"(${vcpu_h * price * 30:,.0f}/month, vCPU only)")
        print("  prices: Dataflow list prices us-central1 (cloud.google.com/dataflow/pricing); memory, disk, "
              "Shuffle/Streaming Engine extra")


if __name__ == "__main__":
    raise SystemExit(main())
