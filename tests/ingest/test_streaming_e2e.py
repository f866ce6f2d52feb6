"""The whole streaming job on the local runner against real Kafka + Pub/Sub, into the DuckDB warehouse.

* N events on each source -> exactly 2N rows (none lost, none duplicated), then a clean stop.
* Killed mid-stream (SIGKILL of the job's process group) and restarted -> still exactly 2N rows:
  Kafka resumes from committed offsets, Pub/Sub redelivers what was not acked, the
  pipeline's event-id dedup and the warehouse's idempotent row ids absorb the replays.
* Malformed messages on either source -> dead letters with their source coordinates; the
  partition / subscription keeps flowing (good events after them arrive).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from deploy.publish import publish, send_payloads
from ingest.contract import Contract, parse_contract
from sinks.duckdb_store import open_readonly
from tests.ingest.conftest import unique_name, wait_for

ROOT = Path(__file__).resolve().parents[2]
TABLES = ("acme_live_events", "orbit_live_offers")
JOB = Path(__file__).resolve().parent / "streaming_job.py"
JOB_ENV: dict[str, str] = {}

pytestmark = pytest.mark.integration


def _contract(tmp_path: Path, services) -> tuple[Contract, Path]:
    raw = yaml.safe_load((ROOT / "examples" / "streaming.yaml").read_text())
    raw["warehouse"]["path"] = str(tmp_path / "wh.duckdb")
    tag = unique_name("e2e")
    for p in raw["partners"]:
        s = p["sources"][0]
        if s["kind"] == "pubsub":
            s["topic"] = f"projects/test-project/topics/{tag}"
            s["subscription"] = f"projects/test-project/subscriptions/{tag}"
        else:
            s["topics"] = [tag]
            s["group_id"] = f"g-{tag}"
            s["bootstrap_servers"] = services.kafka_bootstrap
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(raw))
    return parse_contract(raw, str(path)), path


def _query(contract: Contract, sql: str):
    if not os.path.exists(contract.warehouse.path):
        return None
    con = open_readonly(contract.warehouse.path)
    try:
        return con.execute(sql).fetchall()
    except Exception as exc:  # noqa: BLE001 - a table not created yet reads as "nothing yet"
        if "does not exist" in str(exc):
            return None
        raise
    finally:
        con.close()


def _counts(contract: Contract) -> tuple[int, int]:
    """(rows, distinct event ids) over both partners' main tables."""
    rows = distinct = 0
    for t in TABLES:
        r = _query(contract, f"SELECT count(*), count(DISTINCT _event_id) FROM {t}")
        if r:
            rows += r[0][0]
            distinct += r[0][1]
    return rows, distinct


def _ensure_sources(contract: Contract) -> None:
    send_payloads(contract, "acme_live", [])  # creates topic + subscription before the job subscribes
    send_payloads(contract, "orbit_live", [])


def _launch(contract_path: Path, log: Path) -> subprocess.Popen:
    # PYTHONPATH: the job imports this checkout's packages (a script's sys.path starts at its own folder)
    env = {**os.environ, **JOB_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, str(JOB), str(contract_path)], cwd=ROOT, start_new_session=True,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its Prism child, no chance to ack or commit more
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _stop(proc: subprocess.Popen) -> int:
    """Clean stop: SIGTERM -> the harness cancels the job and exits 0 once it is CANCELLED."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return -9


def test_n_events_per_source_give_exactly_2n_rows_then_clean_stop(live_services, tmp_path):
    n = 60
    contract, path = _contract(tmp_path, live_services)
    _ensure_sources(contract)
    assert publish(contract, "acme_live", rate=0, count=n, seed=1) == n
    assert publish(contract, "orbit_live", rate=0, count=n, seed=1) == n
    log = tmp_path / "job.log"
    job = _launch(path, log)
    try:
        reached = wait_for(lambda: _counts(contract)[0] >= 2 * n, timeout=90)
        time.sleep(3)  # anything duplicated would land now
    finally:
        rc = _stop(job)
    assert reached, f"rows: {_counts(contract)}; log tail:\n{log.read_text()[-3000:]}"
    assert rc == 0 and "job: final state CANCELLED" in log.read_text()
    assert _counts(contract) == (2 * n, 2 * n)
    per_table = [_query(contract, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES]
    assert per_table == [n, n]


def test_restart_mid_stream_loses_and_duplicates_nothing(live_services, tmp_path):
    n = 80
    contract, path = _contract(tmp_path, live_services)
    _ensure_sources(contract)
    log = tmp_path / "job.log"
    publishers = [threading.Thread(target=publish, args=(contract, name), kwargs={"rate": 10, "count": n, "seed": 2})
                  for name in ("acme_live", "orbit_live")]
    job = _launch(path, log)
    try:
        for t in publishers:
            t.start()
        # kill once the stream is flowing but not finished
        assert wait_for(lambda: _counts(contract)[0] >= 20, timeout=90), log.read_text()[-3000:]
        _kill(job)
        killed_at = _counts(contract)[0]
        for t in publishers:
            t.join()
        assert killed_at < 2 * n, "the publishers were too fast for a mid-stream kill"
        job = _launch(path, log)
        # Pub/Sub redelivers unacked messages after the ack deadline (20 s on the emulator subscription)
        reached = wait_for(lambda: _counts(contract)[0] >= 2 * n, timeout=120)
        time.sleep(3)
    finally:
        _kill(job)
    assert reached, f"rows {_counts(contract)}; log tail:\n{log.read_text()[-3000:]}"
    assert _counts(contract) == (2 * n, 2 * n)


def test_malformed_messages_become_dead_letters_and_do_not_stall(live_services, tmp_path):
    n = 10
    contract, path = _contract(tmp_path, live_services)
    _ensure_sources(contract)
    bad = [(b'{"event": {"id": "broken", ', {}), (b"\xff\xfe not utf-8", {}), (b"[1, 2, 3]", {})]
    for partner in ("acme_live", "orbit_live"):
        assert send_payloads(contract, partner, bad) == 3  # first: a stuck reader would never get past them
        assert publish(contract, partner, rate=0, count=n, seed=3) == n
    log = tmp_path / "job.log"
    job = _launch(path, log)
    dead_sql = f"SELECT source, coords, reason FROM {contract.warehouse.dead_letter_table} ORDER BY coords"
    try:
        reached = wait_for(lambda: _counts(contract)[0] >= 2 * n and len(_query(contract, dead_sql) or []) >= 6,
                           timeout=90)
    finally:
        rc = _stop(job)
    assert reached, f"rows {_counts(contract)}, dead letters {_query(contract, dead_sql)}; log:\n{log.read_text()[-3000:]}"
    assert rc == 0
    assert _counts(contract) == (2 * n, 2 * n)
    dead = _query(contract, dead_sql)
    assert len(dead) == 6
    by_source = {s: [c for src, c, _ in dead if src == s] for s in ("kafka", "pubsub")}
    kafka_topic = contract.partner("orbit_live").sources[0].topics[0]
    subscription = contract.partner("acme_live").sources[0].subscription
    assert len(by_source["kafka"]) == 3 and all(c.startswith(f"kafka:{kafka_topic}/") and "@" in c
                                                for c in by_source["kafka"])
    assert len(by_source["pubsub"]) == 3 and all(c.startswith(f"pubsub:{subscription}#") for c in by_source["pubsub"])
    assert {r for _, _, r in dead} <= {"malformed_json", "bad_utf8", "not_an_object"}
