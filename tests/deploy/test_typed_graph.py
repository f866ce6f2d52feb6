"""The Dataflow graph is typed: no pickled coder on any PCollection or state cell, deterministic keys,
deterministic Row schema ids, stateful steps named for their role.

Generic over the graph: it walks whatever pipeline ``ingest.pipeline.build`` makes, built the way
Dataflow gets it (DataflowRunner, ``--dry_run=True``: the runner's overrides applied, no network).
Pickled coders are checked on the streaming graph (the one updated in place) for both warehouse kinds;
key determinism on streaming and bounded graphs.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from apache_beam.options.pipeline_options import StandardOptions

from deploy.dataflow.job import dry_run
from deploy.graph import describe_coder, nondeterministic_keys, pickled_coders, snapshot
from ingest.contract import parse_contract

ROOT = Path(__file__).resolve().parents[2]


def _contract(example: str, warehouse: str):
    raw = yaml.safe_load((ROOT / "examples" / example).read_text())
    raw = copy.deepcopy(raw)
    if warehouse == "bigquery":
        raw["warehouse"] = {"kind": "bigquery", "project": "demo-project", "dataset": "headwater"}
    else:
        raw["warehouse"] = {"kind": "duckdb", "path": "/tmp/never-written.duckdb"}
    return parse_contract(raw, example)


CASES = [(e, w) for e in ("streaming.yaml", "headwater.yaml") for w in ("duckdb", "bigquery")]


_BUILT: dict = {}


def _build(example: str, warehouse: str):
    if (example, warehouse) not in _BUILT:
        _BUILT[(example, warehouse)] = (example, warehouse, dry_run(_contract(example, warehouse), "hw-typed-graph"))
    return _BUILT[(example, warehouse)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{e}-{w}" for e, w in CASES])
def built(request):
    return _build(*request.param)


STREAMING_CASES = [c for c in CASES if c[0] == "streaming.yaml"]


@pytest.fixture(scope="module", params=STREAMING_CASES, ids=[f"{e}-{w}" for e, w in STREAMING_CASES])
def streaming_built(request):
    return _build(*request.param)


def test_no_pcollection_or_state_cell_uses_a_pickled_coder(streaming_built):
    """Streaming graphs: the ones Dataflow updates in place, whose coders its update check compares.
    (Bounded jobs are never updated in place; their keys are checked for determinism below.)"""
    example, warehouse, dry = streaming_built
    assert dry.options.view_as(StandardOptions).streaming
    snap = snapshot(dry.proto)
    assert len(snap["pcollections"]) > 10
    bad = pickled_coders(snap, allow_beam_fileio=True)
    assert not bad, f"{example} / {warehouse}: {len(bad)} PCollections with pickled coders:\n" + "\n".join(bad)
    fileio = set(pickled_coders(snap)) - set(bad)
    # only bounded file reads have Beam's untyped fileio steps (deploy.graph.BEAM_UNTYPED says why)
    assert all("_file_" in b for b in fileio), fileio


def test_keys_of_groupings_and_state_are_deterministic(built):
    example, warehouse, dry = built
    bad = nondeterministic_keys(dry.proto)
    assert not bad, "\n".join(bad)


def test_stateful_steps_are_not_named_after_private_classes(streaming_built):
    _, _, dry = streaming_built
    snap = snapshot(dry.proto)
    stateful = [n for n, t in snap["transforms"].items() if t.get("state") or t.get("timers")]
    ours = [n for n in stateful if n.startswith(("Headwater/", "WriteWarehouse/"))
            and "/Read_" not in n]  # Beam's own composites inside sources keep Beam's names
    assert ours
    assert not [n for n in ours if "ParDo(_" in n or "<lambda" in n], ours


class _Opaque:
    def __init__(self, b: bytes):
        self.b = b


def test_the_checker_catches_a_pickled_coder():
    """The check can fail: an untyped step in an otherwise typed graph is reported by name."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = (p | "Start" >> beam.Create([b"x"]) | "Untyped" >> beam.Map(_Opaque)
         | "Typed" >> beam.Map(lambda o: o.b).with_output_types(bytes))
    bad = pickled_coders(snapshot(p.to_runner_api()))
    assert len(bad) == 1 and bad[0].startswith("Untyped.None: python:FastPrimitivesCoder"), bad


def test_schema_coder_descriptions_name_fields_not_ids(built):
    _, _, dry = built
    comps = dry.proto.components
    rows = [describe_coder(comps, pc.coder_id) for pc in comps.pcollections.values()]
    assert any(r.startswith("row{partner:STRING") for r in rows)


_IDS_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from tests.deploy.test_typed_graph import _contract
from deploy.dataflow.job import dry_run
from apache_beam.portability.api import schema_pb2
dry = dry_run(_contract("streaming.yaml", "bigquery"), "hw-ids")
ids = set()
for c in dry.proto.components.coders.values():
    if c.spec.urn == "beam:coder:row:v1":
        ids.add(schema_pb2.Schema.FromString(c.spec.payload).id)
print(json.dumps(sorted(ids)))
"""


def test_row_schema_ids_are_the_same_in_every_build():
    """Beam draws random schema ids per process unless told; two processes must serialise the same coders."""
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", _IDS_SCRIPT.format(root=str(ROOT))], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert runs[0] and runs[0] == runs[1]
