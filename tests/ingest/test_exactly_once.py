"""Exactly-once on the local runner, rows *and* aggregates, through full speed, kills and outages.

Real Kafka + the Pub/Sub emulator, the whole job in its own process (tests/ingest/streaming_job.py,
the code path of `headwater run`), the DuckDB warehouse. After the stream drains:

* rows: one per published event, none duplicated;
* aggregates: the latest row per (partner, aggregate, key, window) equals a plain recomputation from
  the warehouse rows (``state.recompute`` over ``sinks.warehouse_reader``, what `headwater verify` does),
  and every user's lifetime count equals the number of events published for that user.

Sizes come from the environment so CI stays cheap while the full runs are one variable away:

    HEADWATER_E2E_KAFKA_EVENTS / HEADWATER_E2E_PUBSUB_EVENTS   full speed (CI 5000 / 1000; full 20000 / 5000)
    HEADWATER_E2E_KILL_EVENTS (per source) at HEADWATER_E2E_RATE ev/s each, 3 SIGKILLs (CI 3000 at 200;
    the kill moments are random, HEADWATER_E2E_SEED replays them)
    HEADWATER_E2E_OUTAGE_EVENTS per source and phase (CI 1500)

The outage test starts its *own* Kafka broker and Pub/Sub emulator on free ports (the shared ones
are used by other sessions) and stops only those.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
import yaml

from deploy.publish import _put, ensure_pubsub, make_event, send_payloads
from ingest.contract import Contract, parse_contract
from tests.conftest import wait_no_runner
from tests.ingest.conftest import pubsub_backlog, unique_name, wait_for
from tests.ingest.test_streaming_e2e import JOB, ROOT, _query

pytestmark = pytest.mark.integration

USERS = 300
TABLES = {"acme_live": "acme_live_events", "orbit_live": "orbit_live_offers"}
COUNT_METRIC = {"acme_live": ("customer_activity", "events"), "orbit_live": ("shopper_offers", "offers_seen")}
MARKER = "HEADWATER_TEST_JOB"


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# -- the job ----------------------------------------------------------------------------------------
class Job:
    """The streaming job in its own process group (job, Prism's supervisor and Prism)."""

    def __init__(self, contract_path: Path, log: Path, env: dict[str, str]):
        self.contract_path, self.log, self.env = contract_path, log, env
        self.marker = uuid.uuid4().hex
        self.proc = None

    def start(self) -> None:
        env = {**os.environ, **self.env, MARKER: self.marker,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with self.log.open("ab") as fh:
            fh.write(f"\n=== start {time.strftime('%X')}\n".encode())
            self.proc = subprocess.Popen([sys.executable, str(JOB), str(self.contract_path)], cwd=ROOT,
                                         start_new_session=True, stdout=fh, stderr=subprocess.STDOUT, env=env)

    def kill(self) -> None:
        """SIGKILL of the whole job: no chance to commit, ack or flush anything more."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        with self.log.open("ab") as fh:
            fh.write(f"\n=== SIGKILL {time.strftime('%X')}\n".encode())

    def stop(self) -> int:
        """SIGTERM (a clean stop): the job cancels, commits what is durable and exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _contract(tmp_path: Path, kafka: str, pubsub_project: str = "test-project") -> tuple[Contract, Path]:
    raw = yaml.safe_load((ROOT / "examples" / "streaming.yaml").read_text())
    raw["warehouse"]["path"] = str(tmp_path / "wh.duckdb")
    tag = unique_name("x1")
    for p in raw["partners"]:
        s = p["sources"][0]
        if s["kind"] == "pubsub":
            s["topic"] = f"projects/{pubsub_project}/topics/{tag}"
            s["subscription"] = f"projects/{pubsub_project}/subscriptions/{tag}"
        else:
            s["topics"] = [tag]
            s["group_id"] = f"g-{tag}"
            s["bootstrap_servers"] = kafka
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(raw))
    return parse_contract(raw, str(path)), path


def _messages(contract: Contract, partner: str, count: int, seed: int, start: int = 0):
    """``count`` realistic events over USERS users -> ([(payload, attributes)], Counter(user))."""
    p = contract.partner(partner)
    rng = random.Random(seed * 7919 + start)
    out, per_user = [], Counter()
    for i in range(start, start + count):
        payload, attrs = make_event(p, i, rng, seed)
        doc = orjson.loads(payload)
        user = f"user-{rng.randrange(USERS):05d}"
        _put(doc, p.envelope.user_id, user)
        out.append((orjson.dumps(doc), {**attrs, "event_id": f"{partner}-{seed}-{i:08d}", "user_key": user}))
        per_user[user] += 1
    return out, per_user


def _rows(contract: Contract) -> dict[str, tuple[int, int]]:
    out = {}
    for partner, table in TABLES.items():
        r = _query(contract, f"SELECT count(*), count(DISTINCT _event_id) FROM {table}")
        out[partner] = r[0] if r else (0, 0)
    return out


def _aggregate_state(contract: Contract):
    """(drift vs a recomputation from the warehouse rows, latest lifetime count per (partner, user))."""
    from sinks.warehouse_reader import aggregate_inputs_from_warehouse, latest_aggregate_rows, specs_of
    from state.recompute import recompute

    latest = latest_aggregate_rows(contract)
    want = recompute(specs_of(contract), aggregate_inputs_from_warehouse(contract),
                     as_of={k: v.watermark_us for k, v in latest.items()})
    drift = {k: (latest[k].metrics if k in latest else None, v) for k, v in want.items()
             if k not in latest or latest[k].metrics != v}
    drift.update({k: (latest[k].metrics, None) for k in set(latest) - set(want)})
    counts = {}
    for (partner, agg, key, window), row in latest.items():
        name, metric = COUNT_METRIC[partner]
        if agg == name and window == "lifetime":
            counts[(partner, key)] = row.metrics[metric]
    return drift, counts


def _expected_counts(per_user: dict[str, Counter]) -> dict[tuple[str, str], int]:
    return {(partner, user): n for partner, c in per_user.items() for user, n in c.items()}


def _settled(contract: Contract, total: dict[str, int], expected: dict) -> bool:
    try:
        rows = _rows(contract)
        if any(rows[p] != (n, n) for p, n in total.items()):
            return False
        drift, counts = _aggregate_state(contract)
        return not drift and counts == expected
    except Exception:  # noqa: BLE001 - the file is being written (lock) or a table is not there yet
        return False


def _report(contract: Contract, total: dict[str, int], expected: dict, job: Job) -> str:
    rows = _rows(contract)
    try:
        drift, counts = _aggregate_state(contract)
    except Exception as exc:  # noqa: BLE001
        return f"rows {rows} (want {total}); aggregates unreadable: {exc}"
    wrong = {k: (counts.get(k), n) for k, n in expected.items() if counts.get(k) != n}
    return (f"rows {rows} (want {total}); {len(drift)} aggregate rows differ from the recomputation, e.g. "
            f"{dict(list(drift.items())[:3])}; {len(wrong)} users' counts wrong (got, published), e.g. "
            f"{dict(list(wrong.items())[:5])}\nlog tail:\n{job.text()[-4000:]}")


def _kafka_lag(contract: Contract) -> int:
    """Records not yet committed by the job's consumer group (end offset - committed, all partitions)."""
    from kafka import KafkaConsumer, TopicPartition

    spec = contract.partner("orbit_live").sources[0]
    c = KafkaConsumer(bootstrap_servers=spec.bootstrap_servers.split(","), group_id=spec.group_id,
                      enable_auto_commit=False)
    try:
        tps = [TopicPartition(spec.topics[0], p) for p in sorted(c.partitions_for_topic(spec.topics[0]) or ())]
        end = c.end_offsets(tps)
        return sum(end[tp] - (c.committed(tp) or 0) for tp in tps)
    finally:
        c.close()


def _committed_everything(contract: Contract, job: "Job") -> None:
    """After the rows landed the job commits every offset and acks every message (ledger, not a timer)."""
    assert wait_for(lambda: _kafka_lag(contract) == 0, timeout=60), \
        f"kafka lag {_kafka_lag(contract)}\nlog tail:\n{job.text()[-6000:]}"
    sub = contract.partner("acme_live").sources[0].subscription
    assert pubsub_backlog(sub, max_messages=1000, timeout=10) == 0, job.text()[-6000:]


def _verify_exit_code(path: Path) -> tuple[int, str]:
    """`headwater verify --config PATH`: the operator's check of the same claim (exit 0: no drift)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "verify", "--config", str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def _no_unhandled_errors(log: str) -> None:
    assert "Exception in thread" not in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]


def _send_reliably(contract: Contract, partner: str, msgs: list, rate: float, chunk: int = 500) -> None:
    """Publish in chunks; a chunk whose publish fails (a loaded emulator timing out) is sent again.
    Sending an event twice is harmless: same event id, so one row and one count (the job dedups)."""
    for i in range(0, len(msgs), chunk):
        for attempt in range(5):
            try:
                send_payloads(contract, partner, msgs[i:i + chunk], rate=rate, key_attribute="user_key")
                break
            except Exception:  # noqa: BLE001 - retried; the last failure is raised
                if attempt == 4:
                    raise
                time.sleep(1.0)


def _publish_in_background(contract: Contract, batches: dict[str, list], rate: float) -> list[threading.Thread]:
    threads = [threading.Thread(target=_send_reliably, args=(contract, partner, msgs, rate), daemon=True)
               for partner, msgs in batches.items()]
    for t in threads:
        t.start()
    return threads


# -- full speed ---------------------------------------------------------------------------------------
def test_full_speed_rows_and_aggregates_exact_for_every_user(live_services, tmp_path):
    n_kafka = _env_int("HEADWATER_E2E_KAFKA_EVENTS", 5000)
    n_pubsub = _env_int("HEADWATER_E2E_PUBSUB_EVENTS", 1000)
    contract, path = _contract(tmp_path, live_services.kafka_bootstrap)
    kafka_msgs, kafka_users = _messages(contract, "orbit_live", n_kafka, seed=1)
    pubsub_msgs, pubsub_users = _messages(contract, "acme_live", n_pubsub, seed=1)
    send_payloads(contract, "acme_live", [])  # topic + subscription before the job subscribes
    job = Job(path, tmp_path / "job.log", {})
    started = time.monotonic()
    job.start()
    total = {"orbit_live": n_kafka, "acme_live": n_pubsub}
    expected = _expected_counts({"orbit_live": kafka_users, "acme_live": pubsub_users})
    try:
        for t in _publish_in_background(contract, {"orbit_live": kafka_msgs, "acme_live": pubsub_msgs}, rate=0):
            t.join()
        published = time.monotonic() - started
        settled = wait_for(lambda: _settled(contract, total, expected), timeout=600, interval=2)
        elapsed = time.monotonic() - started
        if settled:
            _committed_everything(contract, job)
    finally:
        rc = job.stop()
    assert settled, _report(contract, total, expected, job)
    assert rc == 0 and "job: final state CANCELLED" in job.text(), job.text()[-3000:]
    _no_unhandled_errors(job.text())
    assert not wait_no_runner(job.marker, marker=MARKER), "a runner process outlived the job (SIGTERM)"
    code, out = _verify_exit_code(path)
    assert code == 0, out
    print(f"\nfull speed: {n_kafka}+{n_pubsub} events, {len(expected)} users exact; published in "
          f"{published:.1f}s, rows and aggregates exact {elapsed:.1f}s after launch "
          f"({(n_kafka + n_pubsub) / elapsed:.0f} ev/s end to end)")


# -- SIGKILL x3 ---------------------------------------------------------------------------------------
def test_three_sigkills_at_random_moments_lose_and_double_count_nothing(live_services, tmp_path):
    n = _env_int("HEADWATER_E2E_KILL_EVENTS", 3000)
    rate = float(os.environ.get("HEADWATER_E2E_RATE", 200))
    seed = int(os.environ.get("HEADWATER_E2E_SEED") or time.time_ns() % 1_000_000)
    rnd = random.Random(seed)  # the kill moments; HEADWATER_E2E_SEED replays a run's
    contract, path = _contract(tmp_path, live_services.kafka_bootstrap)
    kafka_msgs, kafka_users = _messages(contract, "orbit_live", n, seed=2)
    pubsub_msgs, pubsub_users = _messages(contract, "acme_live", n, seed=2)
    send_payloads(contract, "acme_live", [])
    total = {"orbit_live": n, "acme_live": n}
    expected = _expected_counts({"orbit_live": kafka_users, "acme_live": pubsub_users})
    job = Job(path, tmp_path / "job.log", {})
    job.start()
    kills = []
    try:
        publishers = _publish_in_background(contract, {"orbit_live": kafka_msgs, "acme_live": pubsub_msgs}, rate)
        span = n / rate
        for k in range(3):
            before = sum(r[0] for r in _rows(contract).values())
            # the restarted job is flowing again (its first rows landed), then a random moment
            assert wait_for(lambda: sum(r[0] for r in _rows(contract).values()) > before, timeout=120), \
                job.text()[-3000:]
            time.sleep(rnd.uniform(0.2, max(0.5, span / 4)))
            kills.append(sum(r[0] for r in _rows(contract).values()))
            job.kill()
            assert not wait_no_runner(job.marker, marker=MARKER), "Prism outlived a SIGKILL of its job"
            job.start()  # at once: Kafka resumes from the committed offsets, Pub/Sub redelivers unacked
        for t in publishers:
            t.join()
        settled = wait_for(lambda: _settled(contract, total, expected), timeout=600, interval=2)
        if settled:
            _committed_everything(contract, job)
    finally:
        rc = job.stop()
    assert settled, f"HEADWATER_E2E_SEED={seed}, kills at rows {kills}; " + _report(contract, total, expected, job)
    assert rc == 0, job.text()[-3000:]
    code, out = _verify_exit_code(path)
    assert code == 0, out
    print(f"\nHEADWATER_E2E_SEED={seed}: kills at {kills} rows of {2 * n}: rows exact, "
          f"{len(expected)} users' aggregates exact")


# -- outages ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServices:
    """A Kafka broker and a Pub/Sub emulator of this test only (deploy/local/services.sh, own ports and
    own $HEADWATER_LOCAL; the broker's jars are shared with the main installation, so no Maven run)."""

    def __init__(self, root: Path):
        self.local = root
        shared = Path(os.environ.get("HEADWATER_LOCAL", ROOT / ".local")) / "kafka" / "libs"
        (root / "kafka").mkdir(parents=True, exist_ok=True)
        if shared.is_dir():
            os.symlink(shared, root / "kafka" / "libs")
        self.env = {**os.environ, "HEADWATER_LOCAL": str(root), "HEADWATER_KAFKA_PORT": str(_free_port()),
                    "HEADWATER_KAFKA_CONTROLLER_PORT": str(_free_port()),
                    "HEADWATER_PUBSUB_PORT": str(_free_port())}
        self.kafka = f"127.0.0.1:{self.env['HEADWATER_KAFKA_PORT']}"
        self.pubsub = f"127.0.0.1:{self.env['HEADWATER_PUBSUB_PORT']}"

    def _run(self, *args: str) -> None:
        r = subprocess.run([str(ROOT / "deploy" / "local" / "services.sh"), *args], env=self.env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"services.sh {' '.join(args)}: {r.stdout}\n{r.stderr}"

    def up(self, *names: str) -> None:
        self._run("up", *names)

    def down(self, *names: str) -> None:
        self._run("down", *names)


@pytest.fixture
def private_services(tmp_path_factory):
    svc = PrivateServices(tmp_path_factory.mktemp("private-services"))
    try:
        svc.up("kafka", "pubsub")
        yield svc
    finally:
        svc.down("kafka", "pubsub")
        shutil.rmtree(svc.local, ignore_errors=True)


def test_broker_down_and_emulator_restarted_mid_stream_recover_and_lose_nothing(private_services, tmp_path,
                                                                                   monkeypatch):
    n = _env_int("HEADWATER_E2E_OUTAGE_EVENTS", 1500)
    svc = private_services
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", svc.pubsub)
    contract, path = _contract(tmp_path, svc.kafka)
    kafka_a, ka = _messages(contract, "orbit_live", n, seed=3)
    kafka_b, kb = _messages(contract, "orbit_live", n, seed=3, start=n)
    pubsub_a, pa = _messages(contract, "acme_live", n, seed=3)
    pubsub_b, pb = _messages(contract, "acme_live", n, seed=3, start=n)
    send_payloads(contract, "acme_live", [])
    job = Job(path, tmp_path / "job.log", {"PUBSUB_EMULATOR_HOST": svc.pubsub})
    job.start()
    total = {"orbit_live": 2 * n, "acme_live": 2 * n}
    expected = _expected_counts({"orbit_live": ka + kb, "acme_live": pa + pb})
    try:
        # phase 1: both sources flowing; the broker goes down while its records are still being read
        for t in _publish_in_background(contract, {"orbit_live": kafka_a, "acme_live": pubsub_a}, rate=0):
            t.join()
        assert wait_for(lambda: _rows(contract)["orbit_live"][0] > 0, timeout=120), job.text()[-3000:]
        svc.down("kafka")
        down_at = time.monotonic()
        # meanwhile every Pub/Sub message is pulled; then the emulator restarts (it forgets everything)
        assert wait_for(lambda: _rows(contract)["acme_live"][0] >= n, timeout=120), _report(
            contract, total, expected, job)
        svc.down("pubsub")
        svc.up("pubsub")
        ensure_pubsub(contract.partner("acme_live").sources[0], "acme_live")  # topic + subscription again
        time.sleep(max(0.0, 20 - (time.monotonic() - down_at)))  # the broker stays down ~20 s
        svc.up("kafka")
        # phase 2: new events on both, read by the same job
        for t in _publish_in_background(contract, {"orbit_live": kafka_b, "acme_live": pubsub_b}, rate=0):
            t.join()
        settled = wait_for(lambda: _settled(contract, total, expected), timeout=600, interval=2)
    finally:
        rc = job.stop()
    assert settled, _report(contract, total, expected, job)
    assert rc == 0, job.text()[-3000:]
    log = job.text()
    _no_unhandled_errors(log)
    # the outage bit, and was reported once rather than as a stream of client errors
    assert log.count("the broker is unreachable") >= 1 and "reachable again" in log, log[-4000:]
    assert sum(1 for line in log.splitlines() if "ECONNREFUSED" in line) <= 3, log[-4000:]
    if settled:
        _committed_everything(contract, job)
    print("\noutage log lines:\n" + "\n".join(line[:300] for line in log.splitlines() if "headwater" in line))


# -- lifecycle ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL of the job process alone"])
def test_no_runner_process_outlives_the_job(live_services, tmp_path, how):
    contract, path = _contract(tmp_path, live_services.kafka_bootstrap)
    send_payloads(contract, "acme_live", [])
    send_payloads(contract, "orbit_live", _messages(contract, "orbit_live", 20, seed=4)[0])
    job = Job(path, tmp_path / "job.log", {})
    job.start()
    try:
        assert wait_for(lambda: _rows(contract)["orbit_live"][0] == 20, timeout=120), job.text()[-3000:]
        from tests.conftest import runner_processes

        assert runner_processes(job.marker, MARKER), "no Prism found for the running job: the check cannot bite"
        if how == "SIGKILL of the job process alone":
            os.kill(job.proc.pid, signal.SIGKILL)  # not the group: Prism's supervisor must notice by itself
            job.proc.wait(timeout=30)
        else:
            job.proc.send_signal(getattr(signal, how))
            assert job.proc.wait(timeout=90) == 0, job.text()[-3000:]
            assert "job: final state CANCELLED" in job.text()
        left = wait_no_runner(job.marker, marker=MARKER)
    finally:
        if job.proc.poll() is None:
            job.kill()
    assert not left, f"runner processes left after {how}: {left}"
    if how != "SIGKILL of the job process alone":
        _no_unhandled_errors(job.text())
