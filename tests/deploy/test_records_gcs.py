"""Deploy records and baselines on gs:// (fake-gcs-server through Beam's GCS filesystem), as a team keeps them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.cli import main as cli
from deploy.dataflow.records import DeployRecords, read_json
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)
from tests.ingest.test_objectstore import upload_gcs

ROOT = Path(__file__).resolve().parents[2]
STREAMING = str(ROOT / "examples" / "streaming.yaml")
BEAM = ["--project=acme-data", "--region=europe-west1", "--temp_location=gs://acme-data-df/tmp"]


@pytest.mark.integration
def test_plan_reads_the_baseline_and_records_from_gcs(cloud_services, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", cloud_services.gcs)
    bucket = unique_id("hwdeploy").replace("_", "-")
    upload_gcs(cloud_services.gcs, bucket, {"keep": b""})
    local = tmp_path / "base.json"
    assert cli(["deploy", "plan", "--config", STREAMING, "--job", "hw-gcs", "--write-baseline", str(local),
                "--records", str(tmp_path / "none"), *BEAM]) == 0
    snap = json.loads(local.read_text())
    snap["job_id"] = "j-1"
    records = DeployRecords(f"gs://{bucket}/deploys")
    path = records.record("hw-gcs", snap)
    assert path == f"gs://{bucket}/deploys/hw-gcs.json" and read_json(path)["job_id"] == "j-1"
    capsys.readouterr()
    # the job's record on gs:// is the default baseline; an explicit gs:// --baseline works the same
    assert cli(["deploy", "plan", "--config", STREAMING, "--job", "hw-gcs", "--records", f"gs://{bucket}/deploys",
                *BEAM]) == 0
    assert capsys.readouterr().out.startswith("job hw-gcs: compatible\n")
    assert cli(["deploy", "plan", "--config", STREAMING, "--job", "hw-gcs", "--baseline", path,
                "--records", str(tmp_path / "none"), *BEAM]) == 0
    assert cli(["deploy", "plan", "--config", STREAMING, "--job", "hw-gcs",
                "--baseline", f"gs://{bucket}/deploys/missing.json", *BEAM]) == 2
