"""Real local object stores and BigQuery emulator for integration tests (no mocks, no silent skips).

``cloud_services`` (session scope) runs ``deploy/local/services.sh up gcs s3 bigquery`` (the script
users and CI run) and yields the endpoints. Servers this fixture started are stopped at the end
(unless HEADWATER_KEEP_SERVICES=1); servers already running are left alone. If a server cannot
start the fixture raises, so the tests *error* with the script's message.

Import it in a test module or conftest: ``from tests.conftest_cloud import cloud_services``.
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
NAMES = ("gcs", "s3", "bigquery")

__all__ = ["CloudServices", "cloud_services", "unique_id"]


@dataclass(frozen=True)
class CloudServices:
    gcs: str  # http://127.0.0.1:4443 (STORAGE_EMULATOR_HOST)
    s3: str  # http://127.0.0.1:5000
    bigquery: str  # http://127.0.0.1:9050

    def env(self) -> dict:
        """The environment ``ingest.objectstore.objectstore_options`` reads."""
        return {"STORAGE_EMULATOR_HOST": self.gcs, "HEADWATER_S3_ENDPOINT": self.s3,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def unique_id(prefix: str) -> str:
    """A fresh bucket / dataset name (lowercase letters, digits, underscores: valid for GCS, S3 and BigQuery)."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SERVICES), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def cloud_services() -> Iterator[CloudServices]:
    running = {s for s in NAMES if _run("status", s).returncode == 0}
    up = _run("up", *NAMES)
    if up.returncode != 0:
        raise RuntimeError(f"deploy/local/services.sh up {' '.join(NAMES)} failed (rc={up.returncode}):\n"
                           f"{up.stdout}\n{up.stderr}")
    try:
        yield CloudServices(gcs=f"http://127.0.0.1:{os.environ.get('HEADWATER_GCS_PORT', '4443')}",
                            s3=f"http://127.0.0.1:{os.environ.get('HEADWATER_S3_PORT', '5000')}",
                            bigquery=f"http://127.0.0.1:{os.environ.get('HEADWATER_BQ_PORT', '9050')}")
    finally:
        started = [s for s in NAMES if s not in running]
        if started and os.environ.get("HEADWATER_KEEP_SERVICES") != "1":
            _run("down", *started)
