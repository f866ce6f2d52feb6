"""Real local Kafka and Pub/Sub servers for integration tests (no mocks, no silent skips).

``live_services`` (session scope) yields a :class:`Services` with the endpoints.

* A Docker engine is reachable: testcontainers start ``apache/kafka`` (KRaft)
  and Google's emulator image.
* Otherwise: ``deploy/local/services.sh up kafka pubsub``, the same script users
  and CI run. Servers this fixture started are stopped at the end; servers
  that were already running are left alone.

If a server cannot start, the fixture raises, so every test using it
*errors* (never skips) with the script's message.

Tests import the fixture from their conftest: ``from tests.conftest_services import live_services``.
"""
from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "deploy" / "local" / "services.sh"

__all__ = ["Services", "live_services", "unique_name"]


@dataclass(frozen=True)
class Services:
    kafka_bootstrap: str
    pubsub_host: str
    how: str  # "processes" | "testcontainers"


def unique_name(prefix: str) -> str:
    """A fresh topic/subscription/group name (3+ chars, emulator-safe)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure to reach an engine means "no Docker"
        return False


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SERVICES), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def live_services() -> Iterator[Services]:
    if _docker_available() and os.environ.get("HEADWATER_TEST_SERVICES") != "processes":
        yield from _containers()
        return
    running = {s for s in ("kafka", "pubsub") if _run_script("status", s).returncode == 0}
    up = _run_script("up", "kafka", "pubsub")
    if up.returncode != 0:
        raise RuntimeError(f"deploy/local/services.sh up kafka pubsub failed (rc={up.returncode}):\n"
                           f"{up.stdout}\n{up.stderr}")
    host = f"127.0.0.1:{os.environ.get('HEADWATER_PUBSUB_PORT', '8085')}"
    old = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    try:
        yield Services(f"127.0.0.1:{os.environ.get('HEADWATER_KAFKA_PORT', '9092')}", host, "processes")
    finally:
        if old is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = old
        started = [s for s in ("kafka", "pubsub") if s not in running]
        if started and os.environ.get("HEADWATER_KEEP_SERVICES") != "1":
            _run_script("down", *started)


def _containers() -> Iterator[Services]:  # pragma: no cover - needs a Docker engine
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.kafka import KafkaContainer

    kafka = KafkaContainer("apache/kafka:4.1.1").with_kraft()
    emulator = (DockerContainer("gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators")
                .with_command("gcloud beta emulators pubsub start --host-port=0.0.0.0:8085 --project=test-project")
                .with_exposed_ports(8085))
    with kafka, emulator:
        wait_for_logs(emulator, "Server started", timeout=120)
        host = f"{emulator.get_container_host_ip()}:{emulator.get_exposed_port(8085)}"
        old = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        try:
            yield Services(kafka.get_bootstrap_server(), host, "testcontainers")
        finally:
            if old is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = old
