"""Step names, coders and state specs of the job are a contract: compare with the checked-in manifest."""
import ast
import json
from pathlib import Path

import pytest

from deploy.manifest import DEFAULT_MANIFEST, NAME_MAPPING, STREAMING_MANIFEST, step_manifest, unmapped_changes
from ingest.contract import load_contract

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def current():
    return step_manifest(load_contract(ROOT / "examples" / "headwater.yaml"))


@pytest.fixture(scope="module")
def streaming():
    return step_manifest(load_contract(ROOT / "examples" / "streaming.yaml"))


def test_streaming_manifest_matches_checked_in(streaming):
    _compare(streaming, STREAMING_MANIFEST, "examples/streaming.yaml")
    assert any("ReadFromPubSub" in s for s in streaming["steps"]), "Dataflow graph must use Beam's native Pub/Sub read"
    assert any(s.endswith("ComputeAggregates/AggregatePerKey/PerKeyState") for s in streaming["stateful"])


def test_step_manifest_matches_checked_in(current):
    _compare(current, DEFAULT_MANIFEST, "examples/headwater.yaml")


def _compare(current, path, config):
    expected = json.loads(path.read_text())
    if current != expected:
        import difflib

        diff = "\n".join(difflib.unified_diff(json.dumps(expected, indent=1, sort_keys=True).splitlines(),
                                              json.dumps(current, indent=1, sort_keys=True).splitlines(),
                                              str(path.name), "this build", lineterm=""))
        pytest.fail(f"the job's steps changed; if on purpose, run `headwater manifest --config {config} "
                    "--write` and add renames of stateful steps to deploy/manifest/name_mapping.json:\n" + diff)


def test_no_step_is_named_after_a_line_number_or_lambda(current):
    for name in current["steps"]:
        if "/Create/" in name and "<lambda at core.py:" in name:
            continue  # inside Beam's own beam.Create: fixed per Beam release, not ours to label
        assert "<lambda" not in name and ".py:" not in name, name


def test_stateful_steps_are_recorded_with_state_and_timers(streaming):
    assert streaming["stateful"], "expected the dedup and aggregate steps"
    names = " ".join(streaming["stateful"])
    assert "DropDuplicateEvents" in names and "ComputeAggregates" in names
    for spec in streaming["stateful"].values():
        assert spec["input_coder"] and (spec["state"] or spec["timers"])


def test_name_mapping_is_valid_and_detects_unmapped_renames(current):
    mapping = json.loads(NAME_MAPPING.read_text())
    assert isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
    assert unmapped_changes(current, current, {}) == []
    renamed = {"steps": current["steps"], "stateful": {k + "V2": v for k, v in current["stateful"].items()}}
    assert len(unmapped_changes(current, renamed, {})) == len(current["stateful"])
    assert unmapped_changes(current, renamed, {k: k + "V2" for k in current["stateful"]}) == []


def test_sources_have_no_unlabeled_transforms():
    """Static check: every `|` application in the packages uses `"Label" >> transform`."""
    offenders = []
    for pkg in ("ingest", "flatten", "state", "sinks", "backfill", "deploy"):
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
                    right = node.right
                    if isinstance(right, ast.Call) and isinstance(right.func, ast.Attribute) \
                            and isinstance(right.func.value, ast.Name) and right.func.value.id == "beam":
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"unlabeled beam transforms: {offenders}"
