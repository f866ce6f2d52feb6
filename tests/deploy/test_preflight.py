"""Launch preflight of live sources (issue 10, item 7), against the real local Kafka and Pub/Sub emulator.

`headwater run` with a dead broker / emulator port, or without credentials, or with a missing topic or
subscription, fails in seconds with one line per problem naming partner, source and fix, exit 2, no
traceback, and no runner process started. A good contract passes (and `run` creates a missing emulator
subscription whose topic exists; `validate` changes nothing).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ingest.contract import parse_contract
from ingest.live_check import check_live_sources
from tests.conftest_services import live_services, unique_name  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw(kafka: str, topics=None, pattern=None, subscription="projects/test-project/subscriptions/s-none",
         topic="projects/test-project/topics/t-none", tmp: Path = Path("/tmp")) -> dict:
    ksrc = {"kind": "kafka", "bootstrap_servers": kafka, "group_id": "g"}
    if pattern:
        ksrc["topic_pattern"] = pattern
    else:
        ksrc["topics"] = topics or ["t-none"]
    psrc = {"kind": "pubsub", "subscription": subscription}
    if topic:
        psrc["topic"] = topic
    return {"warehouse": {"kind": "duckdb", "path": str(tmp / "wh.duckdb")},
            "masking": {"allow_dev_key": True},
            "partners": [{"name": "pubpartner", "sources": [psrc], "table": {"name": "pub_events"}},
                         {"name": "kafpartner", "sources": [ksrc], "table": {"name": "kaf_events"}}]}


def _prisms() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()[1:] if "prism" in line and "--job_port" in line}


def _run_cli(tmp_path: Path, raw: dict, *args: str, env_over: dict) -> tuple[subprocess.CompletedProcess, float]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, **env_over}
    env = {k: v for k, v in env.items() if v is not None}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "deploy.cli", *args, "--config", str(cfg)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return r, time.monotonic() - t0


def test_run_with_dead_ports_fails_fast_and_starts_nothing(tmp_path):
    before = _prisms()
    dead = _free_port()
    r, took = _run_cli(tmp_path, _raw(f"127.0.0.1:{dead}", tmp=tmp_path), "run",
                       env_over={"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{dead}"})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln.strip() for ln in r.stderr.splitlines()]
    assert lines[0] == "headwater: contract: 2 error(s)"
    assert (f"partner 'pubpartner': sources[0] pubsub projects/test-project/subscriptions/s-none: Pub/Sub emulator at "
            f"127.0.0.1:{dead} (PUBSUB_EMULATOR_HOST) not reachable (connection refused); "
            f"fix: deploy/local/services.sh up pubsub") in lines
    assert (f"partner 'kafpartner': sources[0] kafka 127.0.0.1:{dead} ['t-none']: broker not reachable "
            f"(127.0.0.1:{dead} connection refused); fix: deploy/local/services.sh up kafka") in lines
    assert len(lines) == 3 and "Traceback" not in r.stderr and "starting service" not in r.stderr
    assert took < 20  # interpreter start + ~3 s checks, run in parallel
    assert _prisms() - before == set()  # no runner was started (checked in the process table)


def test_no_emulator_and_no_credentials(tmp_path, live_services):
    r, _ = _run_cli(tmp_path, _raw(live_services.kafka_bootstrap, tmp=tmp_path), "validate",
                    env_over={"PUBSUB_EMULATOR_HOST": None, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none.json"),
                              "CLOUDSDK_CONFIG": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("partner 'pubpartner': sources[0] pubsub projects/test-project/subscriptions/s-none: no "
            "PUBSUB_EMULATOR_HOST and no Google credentials") in r.stderr
    assert "fix, locally: deploy/local/services.sh up pubsub && export PUBSUB_EMULATOR_HOST=127.0.0.1:8085" in r.stderr


def test_missing_topics_and_subscription_on_the_real_servers(tmp_path, live_services):
    topic = unique_name("hw-pf-missing")
    raw = _raw(live_services.kafka_bootstrap, topics=[topic],
               subscription=f"projects/test-project/subscriptions/{unique_name('sub')}",
               topic=f"projects/test-project/topics/{unique_name('top')}", tmp=tmp_path)
    problems = check_live_sources(parse_contract(raw))
    assert len(problems) == 2
    assert problems[0].startswith("partner 'pubpartner': sources[0] pubsub ") and \
        "subscription and its topic" in problems[0] and "do not exist" in problems[0] and \
        "headwater publish --config <contract> --partner pubpartner creates both" in problems[0]
    assert problems[1] == (f"partner 'kafpartner': sources[0] kafka {live_services.kafka_bootstrap} ['{topic}']: "
                           f"topic(s) ['{topic}'] not found; fix: headwater publish --config <contract> --partner "
                           f"kafpartner creates the first topic, or kafka-topics.sh --create --topic <name>")
    # a topic_pattern that matches nothing; a subscription without a topic to create it from
    raw = _raw(live_services.kafka_bootstrap, pattern=r"hw-pf-nothing-[0-9a-f]{10}", topic=None, tmp=tmp_path)
    problems = check_live_sources(parse_contract(raw))
    assert "no 'topic' is configured" in problems[0]
    assert "no topic matches topic_pattern 'hw-pf-nothing-[0-9a-f]{10}'" in problems[1]


def test_good_sources_pass_and_run_creates_a_missing_emulator_subscription(tmp_path, live_services):
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    ktopic = unique_name("hw-pf-ok")
    admin = KafkaAdminClient(bootstrap_servers=[live_services.kafka_bootstrap], client_id="test-preflight")
    try:
        admin.create_topics([NewTopic(ktopic, 1, 1)])
    finally:
        admin.close()
    ptopic = f"projects/test-project/topics/{unique_name('top')}"
    sub = f"projects/test-project/subscriptions/{unique_name('sub')}"
    pubsub_v1.PublisherClient().create_topic(request={"name": ptopic})
    contract = parse_contract(_raw(live_services.kafka_bootstrap, topics=[ktopic], subscription=sub, topic=ptopic,
                                   tmp=tmp_path))
    subscriber = pubsub_v1.SubscriberClient()
    try:
        assert check_live_sources(contract, create_subscriptions=False) == []  # validate: creatable is fine
        with pytest.raises(gexc.NotFound):  # ... and nothing was created
            subscriber.get_subscription(request={"subscription": sub})
        assert check_live_sources(contract) == []  # run: created
        assert subscriber.get_subscription(request={"subscription": sub}).topic == ptopic
        assert check_live_sources(contract) == []  # and now simply present
        pattern = parse_contract(_raw(live_services.kafka_bootstrap, pattern=r"hw-pf-ok-[0-9a-f]{10}", subscription=sub,
                                      topic=ptopic, tmp=tmp_path))
        assert check_live_sources(pattern) == []
    finally:
        subscriber.close()
    r, _ = _run_cli(tmp_path, _raw(live_services.kafka_bootstrap, topics=[ktopic], subscription=sub, topic=ptopic,
                                   tmp=tmp_path), "validate", env_over={})
    assert r.returncode == 0 and "OK (2 partners, streaming" in r.stdout, r.stderr
