"""Update drill (offline): each everyday edit of a running streaming job gets the right verdict and exit
code from `headwater deploy plan`, and the saved Dataflow job request is the one an update needs.

The baseline is the snapshot of examples/streaming.yaml as deployed (with the job id a launch records);
each case edits the contract (or the code, for renames and record fields) and plans against it, through
the real CLI entry point (`deploy.cli.main`). No network: the job is built by DataflowRunner in dry-run mode.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
JOB = "hw-drill"
JOB_ID = "2026-12-01_03_00_00-1234567890123456789"
IMAGE = "europe-west1-docker.pkg.dev/acme-data/headwater/worker:drill"
BEAM = ["--project=acme-data", "--region=europe-west1", "--temp_location=gs://acme-data-df/tmp"]


def _raw() -> dict:
    return yaml.safe_load((ROOT / "examples" / "streaming.yaml").read_text())


def _write(tmp: Path, name: str, raw: dict) -> str:
    p = tmp / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(p)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("drill")
    base = tmp / "baseline.json"
    code = cli(["deploy", "plan", "--config", _write(tmp, "c.yaml", _raw()), "--job", JOB, "--image", IMAGE,
                "--records", str(tmp / "records"), "--write-baseline", str(base), *BEAM])
    assert code == 0  # no record yet: "new job"
    doc = json.loads(base.read_text())
    doc["job_id"] = JOB_ID  # what `headwater deploy launch` records once Dataflow answered
    base.write_text(json.dumps(doc))
    return base


def _plan(tmp: Path, raw: dict, baseline: Path, capsys, *extra: str) -> tuple[int, str, dict]:
    job_file = tmp / "job.json"
    code = cli(["deploy", "plan", "--config", _write(tmp, "new.yaml", raw), "--job", JOB, "--image", IMAGE,
                "--baseline", str(baseline), "--save-job", str(job_file), *extra, *BEAM])
    out = capsys.readouterr().out
    return code, out, json.loads(job_file.read_text())


def _assert_update_request(req: dict, mapping: dict) -> None:
    job = req["job"]
    assert req["projectId"] == "acme-data" and req["location"] == "europe-west1"
    assert job["name"] == JOB and job["type"] == "JOB_TYPE_STREAMING"
    assert job["replaceJobId"] == JOB_ID
    assert job.get("transformNameMapping", {}) == mapping
    pool = job["environment"]["workerPools"][0]
    assert pool["workerHarnessContainerImage"] == IMAGE
    assert [c["containerImage"] for c in pool["sdkHarnessContainerImages"]] == [IMAGE]
    opts = job["environment"]["sdkPipelineOptions"]["options"]
    assert opts["update"] is True and opts["streaming"] is True and opts["job_name"] == JOB
    assert opts["transform_name_mapping"] == mapping and opts["sdk_container_image"] == IMAGE
    assert opts["project"] == "acme-data" and opts.get("dry_run") in (None, False)


def test_unchanged_job_is_compatible(tmp_path, baseline, capsys):
    code, out, req = _plan(tmp_path, _raw(), baseline, capsys)
    assert code == 0 and out.startswith(f"job {JOB}: compatible\n"), out
    _assert_update_request(req, {})


def test_add_a_partner_is_compatible(tmp_path, baseline, capsys):
    raw = _raw()
    new = copy.deepcopy(raw["partners"][0])
    new["name"] = "zeta_live"
    new["sources"][0].update(topic="projects/test-project/topics/zeta-events",
                             subscription="projects/test-project/subscriptions/zeta-events-headwater")
    new["table"]["name"] = "zeta_live_events"
    raw["partners"].append(new)
    code, out, req = _plan(tmp_path, raw, baseline, capsys)
    assert code == 0 and out.startswith(f"job {JOB}: compatible\n"), out
    assert "steps added: Headwater/Read_zeta_live_pubsub_0" in out
    assert "aggregate zeta_live/customer_activity added" in out
    _assert_update_request(req, {})


def test_remove_a_source_needs_a_mapping_to_empty(tmp_path, baseline, capsys):
    raw = _raw()
    raw["partners"] = [p for p in raw["partners"] if p["name"] != "orbit_live"]  # its Kafka source goes
    code, out, req = _plan(tmp_path, raw, baseline, capsys)
    assert code == 3 and out.startswith(f"job {JOB}: compatible with mapping\n"), out
    mapping = {"Headwater/Read_orbit_live_kafka_0": ""}
    assert json.dumps(mapping, indent=1, sort_keys=True).replace("\n", "\n    ") in out
    assert "aggregate orbit_live/shopper_offers removed" in out
    _assert_update_request(req, mapping)


def test_add_a_metric_is_compatible_because_state_is_versioned(tmp_path, baseline, capsys):
    raw = _raw()
    raw["partners"][0]["aggregates"][0]["metrics"].append({"name": "biggest", "fn": "max",
                                                           "column": "transaction__amount"})
    code, out, req = _plan(tmp_path, raw, baseline, capsys)
    assert code == 0 and out.startswith(f"job {JOB}: compatible\n"), out
    assert "aggregate acme_live/customer_activity: metrics added ['biggest'] (start empty)" in out
    assert "state migrates on first touch" in out
    _assert_update_request(req, {})


def test_add_a_window_is_compatible(tmp_path, baseline, capsys):
    raw = _raw()
    raw["partners"][1]["aggregates"][0]["windows"] = ["lifetime", "7d"]
    code, out, _ = _plan(tmp_path, raw, baseline, capsys)
    assert code == 0 and out.startswith(f"job {JOB}: compatible\n"), out
    assert "aggregate orbit_live/shopper_offers: windows added ['7d']" in out


def test_change_the_dedup_window_is_compatible(tmp_path, baseline, capsys):
    raw = _raw()
    raw["dedup"] = {"window": "2d"}
    code, out, _ = _plan(tmp_path, raw, baseline, capsys)
    assert code == 0 and out.startswith(f"job {JOB}: compatible\n"), out
    assert "dedup window 86400s -> 172800s" in out


def test_rename_a_stateful_step_with_its_mapping(tmp_path, baseline, capsys, monkeypatch):
    import state.transform

    monkeypatch.setattr(state.transform, "AGG_LABEL", "AggregateByKey")
    old, new = "Headwater/ComputeAggregates/AggregatePerKey", "Headwater/ComputeAggregates/AggregateByKey"
    # without a mapping entry: the stateful step is recognised as renamed, and the verdict says to map it
    code, out, _ = _plan(tmp_path, _raw(), baseline, capsys)
    assert code == 4 and out.startswith(f"job {JOB}: incompatible: drain and replace\n"), out
    assert f"step '{old}/PerKeyState' looks renamed to '{new}/PerKeyState'" in out
    # with it: compatible with mapping, and the request carries it
    names = tmp_path / "names.json"
    names.write_text(json.dumps({old: new}))
    code, out, req = _plan(tmp_path, _raw(), baseline, capsys, "--mapping", str(names))
    assert code == 3 and out.startswith(f"job {JOB}: compatible with mapping\n"), out
    _assert_update_request(req, {old: new})


_FIELD_SCRIPT = """
import sys, json
from typing import NamedTuple, Optional
sys.path.insert(0, {root!r})
import flatten.records as R
fields = list(R.Event.__annotations__.items()) + [("tenant", Optional[str])]
Event = NamedTuple("Event", fields)
Event.__new__.__defaults__ = (None,)
Event.__module__ = R.Event.__module__
R.Event = Event  # before any pipeline module imports it
from deploy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_add_a_field_to_a_record_between_steps_is_incompatible(tmp_path, baseline):
    job_file = tmp_path / "job.json"
    args = ["deploy", "plan", "--config", _write(tmp_path, "c.yaml", _raw()), "--job", JOB, "--image", IMAGE,
            "--baseline", str(baseline), "--save-job", str(job_file), *BEAM]
    r = subprocess.run([sys.executable, "-c", _FIELD_SCRIPT.format(root=str(ROOT)), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 4, r.stdout + r.stderr[-3000:]
    assert r.stdout.startswith(f"job {JOB}: incompatible: drain and replace\n"), r.stdout
    # names the PCollections whose coder changed, with the new field, and the stateful step reading them
    assert "PCollection 'Headwater/DropDuplicateEvents/KeyByEventId.None': coder changed" in r.stdout
    assert "doc:BYTES, tenant:STRING?}" in r.stdout
    assert "drain the running job" in r.stdout
    req = json.loads(job_file.read_text())
    assert "replaceJobId" not in req["job"] and req["job"]["type"] == "JOB_TYPE_STREAMING"  # the replacement job


def test_json_output_and_bad_job_name(tmp_path, baseline, capsys):
    code = cli(["deploy", "plan", "--config", _write(tmp_path, "c.yaml", _raw()), "--job", JOB, "--image", IMAGE,
                "--baseline", str(baseline), "--json", *BEAM])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["verdict"] == "compatible" and doc["exit_code"] == 0 and doc["reasons"] == []
    code = cli(["deploy", "plan", "--config", _write(tmp_path, "c.yaml", _raw()), "--job", "Bad_Name", *BEAM])
    assert code == 2 and "job name 'Bad_Name'" in capsys.readouterr().err
