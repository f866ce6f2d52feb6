"""`headwater deploy build | launch | update | drain | status` without Google Cloud.

There is no Dataflow here: these tests check what would be sent (the job requests written by
``--dry-run --save-job``, the drain request), the files `build` writes (validated against the Dataflow
API's own message types), the deploy records, and that a submission in progress holds Ctrl-C instead
of cancelling anything. The actual HTTP calls to Dataflow are not exercised.
"""
from __future__ import annotations

import json
import os
import signal
import io
from pathlib import Path

import pytest
import yaml
from google.cloud.dataflow_v1beta3.types import ContainerSpec, TemplateMetadata

from deploy.cli import main as cli
from deploy.dataflow.image import BASE_IMAGE, DOCKERFILE, image_tag, source_digest
from deploy.dataflow.records import DeployRecords
from deploy.dataflow.submit import drain_request, held_signals

ROOT = Path(__file__).resolve().parents[2]
STREAMING = str(ROOT / "examples" / "streaming.yaml")
BEAM = ["--project=acme-data", "--region=europe-west1", "--temp_location=gs://acme-data-df/tmp"]
IMAGE = "europe-west1-docker.pkg.dev/acme-data/headwater/worker:t1"


def test_build_writes_a_valid_flex_template_spec_and_prints_the_tag(tmp_path, capsys):
    code = cli(["deploy", "build", "--config", STREAMING, "--project", "acme-data", "--region", "europe-west1",
                "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    tag = out.splitlines()[0]
    assert tag == image_tag("acme-data", "europe-west1")
    assert tag.startswith("europe-west1-docker.pkg.dev/acme-data/headwater/worker:beam2.77.0-py3.11-")
    assert f"docker build -f deploy/dataflow/Dockerfile -t {tag} " in out
    spec_text = (tmp_path / "headwater-flex-template.json").read_text()
    spec = ContainerSpec.from_json(spec_text, ignore_unknown_fields=False)  # the API's own message type
    assert spec.image == tag and spec.sdk_info.language.name == "PYTHON"
    assert spec.default_environment.sdk_container_image == tag
    assert spec.metadata.streaming and spec.metadata.supports_exactly_once
    assert [p.name for p in spec.metadata.parameters] == ["config"]
    meta = TemplateMetadata.from_json((tmp_path / "metadata.json").read_text(), ignore_unknown_fields=False)
    assert meta.name == "headwater" and "masking.key_secret" in meta.parameters[0].help_text


def test_dockerfile_builds_on_beams_sdk_image_with_the_native_extension():
    text = DOCKERFILE.read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms[-1] == "apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}"
    assert "ARG BEAM_VERSION=2.77.0" in text and "ARG PYTHON_VERSION=3.11" in text
    assert BASE_IMAGE == "apache/beam_python3.11_sdk:2.77.0"
    assert "maturin build --release" in text and "import apache_beam, headwater_native" in text
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE" in text and "KEY" not in text.replace("key_secret", "")


def test_image_tag_follows_the_sources(tmp_path):
    for d in ("flatten", "state"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "a.py").write_text("x = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    first = source_digest(tmp_path)
    assert source_digest(tmp_path) == first
    (tmp_path / "state" / "__pycache__").mkdir()
    (tmp_path / "state" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    assert source_digest(tmp_path) == first  # build leftovers do not change the tag
    (tmp_path / "state" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != first


def test_launch_dry_run_writes_a_new_streaming_job_request(tmp_path, capsys):
    job = tmp_path / "launch.json"
    code = cli(["deploy", "launch", "--config", STREAMING, "--job", "hw-live", "--image", IMAGE, "--dry-run",
                "--save-job", str(job), "--records", str(tmp_path / "rec"), *BEAM])
    assert code == 0 and "dry run, nothing sent" in capsys.readouterr().out
    req = json.loads(job.read_text())
    assert req["job"]["type"] == "JOB_TYPE_STREAMING" and "replaceJobId" not in req["job"]
    assert req["job"]["environment"]["workerPools"][0]["workerHarnessContainerImage"] == IMAGE
    assert req["job"]["environment"]["sdkPipelineOptions"]["options"]["sdk_location"] == "container"
    assert DeployRecords(str(tmp_path / "rec")).latest("hw-live") is None  # a dry run records nothing


def _record(tmp_path: Path, job_id: str = "2026-12-01_01_02_03-42") -> DeployRecords:
    """A deploy record as `launch` leaves it (the snapshot it was built from, with Dataflow's job id)."""
    from deploy.plan import build_snapshot
    from ingest.contract import load_contract

    records = DeployRecords(str(tmp_path / "rec"))
    snap, _ = build_snapshot(load_contract(STREAMING), "hw-live", BEAM, IMAGE)
    snap["job_id"] = job_id
    records.record("hw-live", snap)
    return records


def test_update_dry_run_passes_update_mapping_and_validate_only(tmp_path, capsys):
    _record(tmp_path)
    raw = yaml.safe_load(Path(STREAMING).read_text())
    raw["partners"] = [p for p in raw["partners"] if p["name"] != "orbit_live"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    job = tmp_path / "update.json"
    code = cli(["deploy", "update", "--config", str(cfg), "--job", "hw-live", "--image", IMAGE, "--dry-run",
                "--validate-only", "--save-job", str(job), "--records", str(tmp_path / "rec"), *BEAM])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("job hw-live: compatible with mapping\n"), out
    req = json.loads(job.read_text())["job"]
    assert req["replaceJobId"] == "2026-12-01_01_02_03-42"
    assert req["transformNameMapping"] == {"Headwater/Read_orbit_live_kafka_0": ""}
    assert "graph_validate_only" in req["environment"]["serviceOptions"]
    opts = req["environment"]["sdkPipelineOptions"]["options"]
    assert opts["update"] is True and opts["transform_name_mapping"] == {"Headwater/Read_orbit_live_kafka_0": ""}


def test_update_refuses_an_incompatible_change_unless_forced(tmp_path, capsys, monkeypatch):
    import state.transform

    _record(tmp_path)
    monkeypatch.setattr(state.transform, "AGG_LABEL", "AggregateByKey")  # a rename without its mapping entry
    args = ["deploy", "update", "--config", STREAMING, "--job", "hw-live", "--image", IMAGE, "--dry-run",
            "--records", str(tmp_path / "rec"), *BEAM]
    assert cli(args) == 4
    assert "incompatible: drain and replace" in capsys.readouterr().out


def test_update_without_a_record_says_what_to_do(tmp_path, capsys):
    code = cli(["deploy", "update", "--config", STREAMING, "--job", "hw-none", "--dry-run",
                "--records", str(tmp_path / "rec"), *BEAM])
    assert code == 2 and "no deploy record" in capsys.readouterr().out


def test_drain_dry_run_prints_the_request_and_status_reads_the_record(tmp_path, capsys):
    _record(tmp_path)
    code = cli(["deploy", "drain", "--job", "hw-live", "--dry-run", "--records", str(tmp_path / "rec")])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == drain_request("acme-data", "europe-west1", "2026-12-01_01_02_03-42")
    code = cli(["deploy", "status", "--job", "hw-live", "--json", "--records", str(tmp_path / "rec")])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["job_id"] == "2026-12-01_01_02_03-42" and doc["image"] == IMAGE
    assert doc["state"].startswith("unknown (Dataflow not reachable")  # no network here, said plainly
    assert cli(["deploy", "status", "--job", "hw-other", "--records", str(tmp_path / "rec")]) == 1


def test_records_keep_history_and_the_latest(tmp_path):
    records = DeployRecords(str(tmp_path))
    records.record("hw-a", {"created": "2026-12-01T01:00:00+00:00", "n": 1})
    records.record("hw-a", {"created": "2026-12-01T02:00:00+00:00", "n": 2})
    assert records.latest("hw-a")["n"] == 2
    assert sorted(os.listdir(tmp_path / "hw-a")) == ["20261201T0100000000.json", "20261201T0200000000.json"]
    with pytest.raises(ValueError, match="job name"):
        records.latest("Bad Name")


def test_ctrl_c_during_submission_is_held_not_cancelling():
    out = io.StringIO()
    before = signal.getsignal(signal.SIGINT)  # Python's default, or what an earlier test's job server left
    with held_signals(out) as received:
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt mid-submission otherwise
        os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGINT, signal.SIGTERM]
    assert "never cancelled" in out.getvalue()
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_run_with_the_dataflow_runner_points_to_deploy(capsys):
    code = cli(["run", "--config", STREAMING, "--runner=DataflowRunner", "--project=acme-data"])
    assert code == 2 and "headwater deploy plan|launch|update" in capsys.readouterr().err


def test_update_options_parse_the_way_dataflow_runner_reads_them():
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

    from deploy.dataflow.submit import update_argv

    mapping = {"Headwater/Read_orbit_live_kafka_0": "", "Headwater/A": "Headwater/B"}
    opts = PipelineOptions(update_argv(BEAM, mapping, validate_only=True)).view_as(GoogleCloudOptions)
    assert opts.update is True and opts.transform_name_mapping == mapping
    assert opts.dataflow_service_options == ["graph_validate_only"]
    assert PipelineOptions(update_argv(BEAM, {})).view_as(GoogleCloudOptions).dataflow_service_options is None
