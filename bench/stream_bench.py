"""Live-path benchmark: Kafka + Pub/Sub on the local servers -> the streaming job on Prism -> DuckDB.

Not a test. Needs the local servers (``deploy/local/services.sh up kafka pubsub``) and Prism::

    HEADWATER_LOCAL=.local python bench/stream_bench.py [--rate 1000] [--seconds 30] [--backlog 10000]

One streaming job (``ingest.pipeline.run_until_stopped``, what ``headwater run`` runs) reads two partners,
one on Pub/Sub and one on Kafka (acme-style events, masking, dedup, one aggregate with lifetime/1d windows),
in its own process. The bench publishes events carrying their send time (``bench.sent_us``) and polls the
warehouse: a row's latency is the time it was first seen minus its send time (poll period 0.25 s).

1. **steady**: ``--rate`` events/s in total (half per source) for ``--seconds``: p50/p99/max latency and
   the rate rows arrived at;
2. **backlog**: ``--backlog`` events per source published as fast as possible: the sustained rate
   (events / time from the first send to the last row) and the latency under backlog.

Prints a summary and, with ``--json``, writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

POLL_S = 0.25
RETRY_S = 0.02  # after a miss of the file's lock
EMIT_WAIT_S = 12.0  # two emission periods of the bench's aggregate


def contract_dict(db: Path, topic: str, sub_topic: str, subscription: str, bootstrap: str, group: str) -> dict:
    envelope = {"event_id": "event.id", "user_id": "customer.id", "event_time": "event.occurred_at"}
    columns = [{"path": "customer.email", "pii": "tokenize"}, {"path": "customer.ssn", "pii": "hash"},
               {"path": "customer.name", "pii": "drop"},
               {"path": "accounts[].number", "pii": "redact", "keep_last": 4}]
    agg = [{"name": "customer_activity", "windows": ["lifetime", "1d"], "emit_every": "5s",
            "metrics": [{"name": "events", "fn": "count"},
                        {"name": "spend", "fn": "sum", "column": "transaction__amount"}]}]
    return {
        "warehouse": {"kind": "duckdb", "path": str(db)},
        "masking": {"key_env": "HEADWATER_MASK_KEY", "allow_dev_key": True},
        "partners": [
            {"name": "acme_ps", "sources": [{"kind": "pubsub", "topic": sub_topic, "subscription": subscription}],
             "envelope": envelope, "columns": columns, "table": {"name": "acme_ps_events"}, "aggregates": agg},
            {"name": "acme_kf", "sources": [{"kind": "kafka", "bootstrap_servers": bootstrap, "topics": [topic],
                                            "group_id": group, "start": "earliest"}],
             "envelope": envelope, "columns": columns, "table": {"name": "acme_kf_events"}, "aggregates": agg},
        ],
    }


def apply_patches(spec: str) -> None:
    """``module.NAME=python expression;...`` set in the job's process before it starts (variants of constants
    measured back to back; ``--patch``)."""
    import importlib

    for item in filter(None, (x.strip() for x in spec.split(";"))):
        target, expr = item.split("=", 1)
        mod, name = target.rsplit(".", 1)
        m = importlib.import_module(mod)
        value = eval(expr, {"Duration": __import__("apache_beam.utils.timestamp", fromlist=["Duration"]).Duration})  # noqa: S307 - the operator's own measurement flag
        setattr(m, name, value)
        print(f"job: patched {target} = {value!r}", file=sys.stderr, flush=True)


def run_job(contract_path: str) -> int:
    from deploy.cli import exit_after_streaming
    from ingest import pipeline
    from ingest.contract import load_contract

    from flatten import live

    state = pipeline.run_until_stopped(load_contract(contract_path), [],
                                       on_running=lambda: print("job: RUNNING", flush=True))
    print(f"job: final state {state}", flush=True)
    print("job: counters " + json.dumps(live.snapshot()), flush=True)
    exit_after_streaming(0 if state in ("CANCELLED", "DONE") else 1)
    return 0


class Poller(threading.Thread):
    """Reads every row's send time from the warehouse every POLL_S; first sighting per event id = arrival."""

    def __init__(self, db: Path):
        super().__init__(daemon=True)
        self.db = db
        self.arrived: dict[str, float] = {}  # event id -> arrival (epoch s)
        self.sent: dict[str, float] = {}  # event id -> send time (epoch s)
        self.stop = threading.Event()
        self.errors = 0

    def run(self) -> None:
        import duckdb

        last: dict[str, int] = {}  # table -> highest rowid read (rows are appended: read only the new ones)
        wait = POLL_S
        while not self.stop.wait(wait):
            wait = POLL_S
            if not self.db.exists():
                continue
            try:
                con = duckdb.connect(str(self.db), read_only=True)
            except duckdb.Error:
                # The job's writer holds the file (a DuckDB file has one writing process; the job lets readers
                # in between writes, sinks/duckdb_store.py HOLD_*): try again soon, so a row's arrival is when
                # another process could first read it, not when the poll period happened to come round.
                self.errors += 1
                wait = RETRY_S
                continue
            now = time.time()
            try:
                tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
                for t in ("acme_ps_events", "acme_kf_events"):
                    if t in tables:
                        for rid, eid, sent in con.execute(f'SELECT rowid, _event_id, bench__sent_us FROM "{t}" '
                                                          "WHERE rowid > ?", [last.get(t, -1)]).fetchall():
                            last[t] = max(last.get(t, -1), rid)
                            if eid not in self.arrived:
                                self.arrived[eid] = now
                                self.sent[eid] = sent / 1e6
            except duckdb.Error:
                self.errors += 1
            finally:
                con.close()


def publish(contract, partner: str, ids: list[str], rate: float, rng: random.Random) -> None:
    from deploy import synth
    from deploy.publish import send_payloads

    def events():
        for i, eid in enumerate(ids):
            ev = synth.acme_event(i, rng, users=2000)
            ev["event"]["id"] = eid
            ev["event"]["occurred_at"] = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
            ev["bench"] = {"sent_us": int(time.time() * 1e6)}
            yield orjson.dumps(ev), {"event_id": eid, "user_key": ev["customer"]["id"]}

    send_payloads(contract, partner, events(), rate=rate, key_attribute="user_key")


def machine_busy_s() -> float:
    """CPU-seconds all cores spent outside idle and iowait since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pids: list[int]) -> float:
    """user + system CPU seconds of these processes (all their threads) so far, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def peak_rss_mb(pids: list[int]) -> float:
    """Sum of the processes' peak resident memory (VmHWM) in MB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def prism_pids(work: Path) -> list[int]:
    """Prism processes started by this bench's job (their working directory is the bench's)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "cwd") != str(work):
                continue
            cmd = (proc / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if cmd.endswith(b"prism"):
            out.append(int(proc.name))
    return out


def stop_leftover_prism(work: Path) -> int:
    """Stop Prism processes this bench's job started (their working directory is the bench's): the job's
    process exits without waiting for its runner subprocess (``deploy.cli.exit_after_streaming``)."""
    pids = prism_pids(work)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    return len(pids)


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def wait_rows(poller: Poller, ids: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    want = set(ids)
    while time.monotonic() < deadline:
        if want.issubset(poller.arrived.keys()):
            return True
        time.sleep(POLL_S)
    return False


def phase(name: str, contract, poller: Poller, n_per_source: int, rate: float, seed: int, timeout: float,
          cpu=lambda: (0.0, 0.0)) -> dict:
    ids = {p: [f"{name}-{p}-{seed}-{i:07d}" for i in range(n_per_source)] for p in ("acme_ps", "acme_kf")}
    cpu0 = cpu()
    mine0, busy0 = process_cpu_s([os.getpid()]), machine_busy_s()
    t0 = time.time()
    threads = [threading.Thread(target=publish, args=(contract, p, ids[p], rate / 2 if rate else 0.0,
                                                        random.Random(seed + k)))
               for k, p in enumerate(ids)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t_sent = time.time()
    # while the publishers ran: this process (publishers + poller) and the whole machine, in cores
    pub_cores = (process_cpu_s([os.getpid()]) - mine0) / max(t_sent - t0, 1e-9)
    busy_cores = (machine_busy_s() - busy0) / max(t_sent - t0, 1e-9)
    every = ids["acme_ps"] + ids["acme_kf"]
    arrived = poller.arrived
    at_sent = sum(1 for e in every if e in arrived)  # rows already in when the publishers finished
    complete = wait_rows(poller, every, timeout)
    cpu1 = cpu()
    seen = [e for e in every if e in poller.arrived]
    t_last = max((poller.arrived[e] for e in seen), default=time.time())
    lat = [poller.arrived[e] - poller.sent[e] for e in seen]
    res = {"phase": name, "events": len(every), "rows_seen": len(seen), "complete": complete,
           "publish_s": t_sent - t0, "publish_rate": len(every) / max(t_sent - t0, 1e-9),
           "rows_rate": len(seen) / max(t_last - t0, 1e-9),
           # the drain: from the publishers' end to the last row, the job alone on the machine with what was
           # still pending (meaningful when that is a good part of the phase: ``pending_at_sent``)
           "pending_at_sent": len(every) - at_sent,
           "drain_rate": (len(every) - at_sent) / max(t_last - t_sent, 1e-9) if len(every) > at_sent else float("nan"),
           "publishing_cores_bench": pub_cores, "publishing_cores_machine": busy_cores,
           "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "max_s": max(lat, default=float("nan")),
           # CPU from the first send until every row was seen (or the timeout), per million events
           "job_cpu_s_per_m": (cpu1[0] - cpu0[0]) / len(every) * 1e6,
           "prism_cpu_s_per_m": (cpu1[1] - cpu0[1]) / len(every) * 1e6}
    print(f"  {name:<8} {res['events']:>7,} events  published at {res['publish_rate']:>7,.0f}/s  rows at "
          f"{res['rows_rate']:>7,.0f}/s  latency p50 {res['p50_s']:6.2f}s p99 {res['p99_s']:6.2f}s "
          f"max {res['max_s']:6.2f}s  {'complete' if complete else f'INCOMPLETE ({len(seen):,} seen)'}; "
          f"drain {res['drain_rate']:,.0f}/s of {res['pending_at_sent']:,} pending after the sends; "
          f"while publishing: machine {busy_cores:.2f} cores busy, publishers {pub_cores:.2f}; "
          f"CPU-s per M events: job {res['job_cpu_s_per_m']:,.0f}, Prism {res['prism_cpu_s_per_m']:,.0f}",
          flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="steady phase: events/s in total")
    ap.add_argument("--seconds", type=float, default=30.0, help="steady phase duration")
    ap.add_argument("--backlog", type=int, default=10_000, help="backlog phase: events per source")
    ap.add_argument("--timeout", type=float, default=300.0, help="per phase: how long to wait for every row")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--patch", default="", help="measurements: 'module.NAME=expr;...' set in the job's process")
    args = ap.parse_args()
    if args.job:
        apply_patches(args.patch)
        return run_job(args.job)
    os.environ.setdefault("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")
    os.environ.setdefault("PUBSUB_PROJECT_ID", "test-project")
    os.environ.setdefault("HEADWATER_MASK_KEY", "bench-key-0123456789abcdef0123456789abcdef")
    import yaml

    from deploy.publish import ensure_kafka_topic, ensure_pubsub
    from ingest.contract import load_contract

    run_id = f"{int(time.time())}{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="hw-stream-bench-"))
    db = work / "stream.duckdb"
    cpath = work / "contract.yaml"
    cpath.write_text(yaml.safe_dump(contract_dict(
        db, f"bench-{run_id}", f"projects/test-project/topics/bench-{run_id}",
        f"projects/test-project/subscriptions/bench-{run_id}", "127.0.0.1:9092", f"bench-{run_id}")))
    contract = load_contract(cpath)
    ensure_pubsub(contract.partner("acme_ps").sources[0], "acme_ps")
    ensure_kafka_topic(contract.partner("acme_kf").sources[0], "acme_kf")
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs; job on Prism, warehouse {db}",
          flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    job = subprocess.Popen([sys.executable, __file__, "--job", str(cpath), "--patch", args.patch], stdout=subprocess.PIPE,
                           stderr=open(work / "job.log", "wb"), env=env, cwd=str(work), text=True)
    results = []
    peaks: dict = {}
    poller = Poller(db)
    try:
        line = job.stdout.readline()
        if "RUNNING" not in line:
            print(f"job did not start: {line!r}; see {work / 'job.log'}")
            return 2
        poller.start()
        prism = prism_pids(work)

        def cpu() -> "tuple[float, float]":
            return process_cpu_s([job.pid]), process_cpu_s(prism)

        t0 = time.monotonic()
        warm = phase("warmup", contract, poller, 50, 100.0, 1, args.timeout, cpu)
        print(f"  (first rows after {time.monotonic() - t0:.1f}s)", flush=True)
        if not warm["complete"]:
            return 1
        results.append(phase("steady", contract, poller, int(args.rate * args.seconds / 2), args.rate, 2,
                             args.timeout, cpu))
        results.append(phase("backlog", contract, poller, args.backlog, 0.0, 3, args.timeout, cpu))
        time.sleep(EMIT_WAIT_S)  # the aggregates' last emission (emit_every 5 s) before the job stops
        peaks = {"job": peak_rss_mb([job.pid]), "prism": peak_rss_mb(prism)}
        print(f"  peak RSS: job {peaks['job']:,.0f} MB, Prism {peaks['prism']:,.0f} MB", flush=True)
    finally:
        poller.stop.set()
        job.send_signal(signal.SIGTERM)
        try:
            job.wait(timeout=120)
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait()
        stop_leftover_prism(work)
    counters = {}
    for line in job.stdout.read().splitlines():
        if line.startswith("job: counters "):
            counters = json.loads(line[len("job: counters "):])
    for kind in ("rows", "aggregates", "dead_letters"):
        writes = counters.get(f"{kind}_writes", 0)
        if writes:
            print(f"  warehouse writes, {kind}: {writes:,}, {counters.get(f'{kind}_written', 0) / writes:,.1f} per write")
    exact = check_aggregates(contract)
    backlog = results[-1] if results else {}
    steady = results[0] if results else {}
    print(f"\nsustained (backlog) {backlog.get('rows_rate', 0):,.0f} events/s (drain after the sends "
          f"{backlog.get('drain_rate', float('nan')):,.0f}/s); steady {args.rate:,.0f}/s: "
          f"p50 {steady.get('p50_s', float('nan')):.2f}s p99 {steady.get('p99_s', float('nan')):.2f}s "
          f"(poll period {POLL_S}s; reader lock misses {poller.errors})")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "rate": args.rate, "counters": counters,
                                               "aggregates_exact": exact, "peak_rss_mb": peaks, "load_average": os.getloadavg()}, indent=2))
    return 0 if all(r["complete"] for r in results) and exact.get("ok") else 1


def check_aggregates(contract) -> dict:
    """Every key's latest aggregate row against the recomputation from the rows (``headwater verify``): the
    figures above count only if the aggregates the job wrote are exact."""
    from deploy.verify import verify

    rep = verify(contract)
    out = {"ok": rep.ok, "aggregates": [a.as_dict() for a in rep.aggregates]}
    for a in rep.aggregates:
        print(f"  aggregates {a.partner}/{a.aggregate}: {a.keys:,} keys, {a.match:,} match the recomputation from the "
              f"rows, {a.differ} differ, {a.missing} missing, {a.extra} extra", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
