"""The step manifest: every step name of the job, plus coders and state specs of stateful steps.

Dataflow's in-place ``--update`` matches steps by name and refuses (or worse,
silently resets state) when a stateful step's name, coder or state spec changes.
``tests/deploy/test_manifest.py`` compares the job built from ``examples/headwater.yaml``
with the checked-in ``deploy/manifest/steps.json`` and fails with a readable diff;
``headwater manifest --config FILE --write`` regenerates it on purpose, and
renames go into ``deploy/manifest/name_mapping.json`` (Dataflow's transform_name_mapping).
"""
from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path
from typing import Optional, TextIO

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from ingest.contract import Contract

__all__ = ["step_manifest", "check_or_write", "DEFAULT_MANIFEST", "STREAMING_MANIFEST", "NAME_MAPPING",
           "unmapped_changes"]

DEFAULT_MANIFEST = Path(__file__).resolve().parent / "manifest" / "steps.json"
STREAMING_MANIFEST = Path(__file__).resolve().parent / "manifest" / "steps-streaming.json"
NAME_MAPPING = Path(__file__).resolve().parent / "manifest" / "name_mapping.json"
_PARDO = "beam:transform:pardo:v1"


def _coder(components, cid: str) -> str:
    c = components.coders[cid]
    urn = c.spec.urn.replace("beam:coder:", "").replace(":v1", "")
    if c.spec.urn == "beam:coder:row:v1":
        from apache_beam.portability.api import schema_pb2

        schema = schema_pb2.Schema.FromString(c.spec.payload)
        fields = ", ".join(f"{f.name}:{f.type.WhichOneof('type_info')}"
                           f"{'/' + schema_pb2.AtomicType.Name(f.type.atomic_type) if f.type.HasField('atomic_type') else ''}"
                           f"{'?' if f.type.nullable else ''}" for f in schema.fields)
        return f"row{{{fields}}}"
    if c.component_coder_ids:
        return f"{urn}<{', '.join(_coder(components, x) for x in c.component_coder_ids)}>"
    return urn


# Streaming jobs are the ones updated in place, on Dataflow: their manifest must show the graph Dataflow
# sees (native ReadFromPubSub, the streaming aggregate DoFn). Building with DataflowRunner options touches
# GCS even offline (temp bucket checks), so we build with the DirectRunner in streaming mode, which makes
# exactly the same runner-dependent choices (ingest.runner.uses_native_pubsub) and needs no network.
_DATAFLOW_LIKE_ARGV = ["--runner=DirectRunner", "--streaming"]


def step_manifest(contract: Contract) -> dict:
    """Build (not run) the job and describe it: {'steps': [...], 'stateful': {name: {...}}}."""
    from apache_beam.portability.api import beam_runner_api_pb2
    from ingest.pipeline import build

    argv = _DATAFLOW_LIKE_ARGV if contract.streaming else ["--runner=FnApiRunner"]
    p = beam.Pipeline(options=PipelineOptions(argv))
    try:
        build(p, contract)
        proto = p.to_runner_api()
    finally:
        # Beam makes a temp directory per Pipeline and removes it in run(): this one is never run
        shutil.rmtree(p.local_tempdir, ignore_errors=True)
    comps = proto.components
    steps: list[str] = []
    stateful: dict[str, dict] = {}
    for t in comps.transforms.values():
        name = t.unique_name
        if not name or name.startswith("ref_"):
            continue
        steps.append(name)
        if t.spec.urn != _PARDO:
            continue
        payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
        if not payload.state_specs and not payload.timer_family_specs:
            continue
        main_in = [pid for tag, pid in t.inputs.items() if tag not in payload.side_inputs]
        in_coder = _coder(comps, comps.pcollections[main_in[0]].coder_id) if main_in else ""
        states = {}
        for sname, spec in payload.state_specs.items():
            kind = spec.WhichOneof("spec")
            sub = getattr(spec, kind)
            cid = getattr(sub, "element_coder_id", "") or getattr(sub, "coder_id", "") or \
                getattr(sub, "accumulator_coder_id", "")
            states[sname] = f"{kind}:{_coder(comps, cid) if cid else ''}"
        timers = {n: str(s.time_domain) for n, s in payload.timer_family_specs.items()}
        stateful[name] = {"input_coder": in_coder, "state": dict(sorted(states.items())),
                          "timers": dict(sorted(timers.items()))}
    return {"steps": sorted(steps), "stateful": dict(sorted(stateful.items()))}


def unmapped_changes(old: dict, new: dict, mapping: dict) -> list[str]:
    """Stateful or source steps of ``old`` missing from ``new`` and not renamed in ``mapping``: an update would lose them."""
    problems = []
    for name, spec in old.get("stateful", {}).items():
        target = mapping.get(name, name)
        if target not in new.get("stateful", {}):
            problems.append(f"stateful step {name!r} is gone and not in the name mapping")
        elif new["stateful"][target] != spec:
            problems.append(f"stateful step {target!r} changed its coders or state specs: "
                            f"{spec} -> {new['stateful'][target]}")
    return problems


def _dump(m: dict) -> str:
    return json.dumps(m, indent=1, sort_keys=True) + "\n"


def check_or_write(contract: Contract, write: bool, path: Optional[str], out: TextIO) -> int:
    target = Path(path) if path else (STREAMING_MANIFEST if contract.streaming else DEFAULT_MANIFEST)
    current = step_manifest(contract)
    if write:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_dump(current))
        out.write(f"wrote {target}: {len(current['steps'])} steps, {len(current['stateful'])} stateful\n")
        return 0
    if not target.exists():
        out.write(f"no manifest at {target}; create it with --write\n")
        return 1
    old = json.loads(target.read_text())
    if old == current:
        out.write(f"manifest {target}: unchanged ({len(current['steps'])} steps)\n")
        return 0
    diff = difflib.unified_diff(_dump(old).splitlines(), _dump(current).splitlines(),
                                "checked-in", "this build", lineterm="")
    out.write("\n".join(diff) + "\n")
    mapping = json.loads(NAME_MAPPING.read_text()) if NAME_MAPPING.exists() else {}
    for prob in unmapped_changes(old, current, mapping):
        out.write(f"UPDATE-BREAKING: {prob}\n")
    return 1
