"""What Dataflow's update check sees in a job graph: a JSON snapshot of a pipeline proto.

``snapshot(proto)`` describes every transform (name, kind, inputs, outputs, side inputs, state and
timer specs), every PCollection (coder, windowing strategy with its trigger, boundedness) and
every GroupByKey's key/value coders, with names only (no proto ids, which are not stable).
``pickled_coders(proto)`` lists the PCollections whose coder is (or contains) pickle;
``nondeterministic_keys(proto)`` the GroupByKey / stateful inputs whose key coder is not deterministic.
Pure over the proto: no runner, no network.
"""
from __future__ import annotations

import re
from typing import Any

from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2, schema_pb2

__all__ = ["snapshot", "pickled_coders", "nondeterministic_keys", "describe_coder", "PICKLING_CODERS",
           "BEAM_UNTYPED"]

_PARDO = common_urns.primitives.PAR_DO.urn
_GBK = common_urns.primitives.GROUP_BY_KEY.urn
_KV = common_urns.coders.KV.urn
#: Python coders that pickle (or fall back to pickling) values: never in a job that is updated in place.
PICKLING_CODERS = frozenset({"FastPrimitivesCoder", "PickleCoder", "DillCoder", "CloudpickleCoder",
                             "_MemoizingPickleCoder", "Base64PickleCoder", "DeterministicFastPrimitivesCoder",
                             "DeterministicFastPrimitivesCoderV2", "FakeDeterministicFastPrimitivesCoder"})


#: PCollections inside Beam's own fileio composites carry FileMetadata / ReadableFile, which Beam gives no
#: portable coder (and whose outputs it does not type). They exist only in bounded file reads, which
#: run once at launch: batch jobs are never updated in place, and a streaming job does not re-read
#: its files on update. Listed separately by ``pickled_coders(..., allow_beam_fileio=True)``.
BEAM_UNTYPED = re.compile(r"/Read_[a-z][a-z0-9_]*_file_\d+/Files/(Match|ReadMatches|ReshuffleFiles)/")


def _python_coder(payload: bytes):
    from apache_beam.coders.coders import deserialize_coder

    return deserialize_coder(payload)


def _python_names(coder) -> list[str]:
    """Class names of a Python coder object and all its components."""
    names = [type(coder).__name__]
    for c in coder._get_component_coders() if hasattr(coder, "_get_component_coders") else ():
        names += _python_names(c)
    return names


def _row(payload: bytes) -> str:
    schema = schema_pb2.Schema.FromString(payload)

    def ftype(t) -> str:
        kind = t.WhichOneof("type_info")
        if kind == "atomic_type":
            s = schema_pb2.AtomicType.Name(t.atomic_type)
        elif kind == "array_type":
            s = f"array<{ftype(t.array_type.element_type)}>"
        elif kind == "iterable_type":
            s = f"iterable<{ftype(t.iterable_type.element_type)}>"
        elif kind == "map_type":
            s = f"map<{ftype(t.map_type.key_type)},{ftype(t.map_type.value_type)}>"
        elif kind == "row_type":
            s = f"row{{{', '.join(f.name + ':' + ftype(f.type) for f in t.row_type.schema.fields)}}}"
        elif kind == "logical_type":
            s = f"logical<{t.logical_type.urn}>"
        else:
            s = str(kind)
        return s + ("?" if t.nullable else "")

    return "row{" + ", ".join(f"{f.name}:{ftype(f.type)}" for f in schema.fields) + "}"


def describe_coder(components, cid: str) -> str:
    """A readable, id-free description of a coder: ``kv<string_utf8, row{...}>``; Python-only coders
    as ``python:<Class>[<components>]`` (``pickled`` in the urn only means "a Python coder object")."""
    c = components.coders[cid]
    urn = c.spec.urn
    if urn == python_urns.PICKLED_CODER:
        coder = _python_coder(c.spec.payload)
        return "python:" + "/".join(_python_names(coder))
    if urn == common_urns.coders.ROW.urn:
        return _row(c.spec.payload)
    short = urn.replace("beam:coder:", "").replace(":v1", "")
    if c.component_coder_ids:
        return f"{short}<{', '.join(describe_coder(components, x) for x in c.component_coder_ids)}>"
    return short


_PY = re.compile(r"python:([\w/]+)")


def _pickles(description: str) -> bool:
    if "beam:logical:pythonsdk_any" in description:  # a Row field Beam could not type: pickled inside the row
        return True
    return any(n in PICKLING_CODERS for group in _PY.findall(description) for n in group.split("/"))


def _trigger(ws) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(ws.trigger, as_one_line=True)


def _windowing(components, wsid: str) -> dict:
    ws = components.windowing_strategies[wsid]
    return {
        "window_fn": ws.window_fn.urn,
        "window_coder": describe_coder(components, ws.window_coder_id),
        "trigger": _trigger(ws),
        "accumulation": beam_runner_api_pb2.AccumulationMode.Enum.Name(ws.accumulation_mode),
        "allowed_lateness_ms": ws.allowed_lateness,
        "merge_status": beam_runner_api_pb2.MergeStatus.Enum.Name(ws.merge_status),
        "output_time": beam_runner_api_pb2.OutputTime.Enum.Name(ws.output_time),
        "closing_behavior": beam_runner_api_pb2.ClosingBehavior.Enum.Name(ws.closing_behavior),
    }


def _state_spec(components, spec) -> str:
    kind = spec.WhichOneof("spec")
    sub = getattr(spec, kind)
    cids = [getattr(sub, f) for f in ("element_coder_id", "coder_id", "accumulator_coder_id", "key_coder_id",
                                      "value_coder_id") if getattr(sub, f, "")]
    return f"{kind}:" + ",".join(describe_coder(components, c) for c in cids)


def _pcoll_names(components) -> dict[str, str]:
    """PCollection id -> '<producing transform>.<output tag>' (stable across builds, unlike ids)."""
    names = {}
    for t in components.transforms.values():
        if t.subtransforms:
            continue
        for tag, pid in t.outputs.items():
            names.setdefault(pid, f"{t.unique_name}.{tag}")
    for pid in components.pcollections:
        names.setdefault(pid, components.pcollections[pid].unique_name)
    return names


def snapshot(proto: beam_runner_api_pb2.Pipeline) -> dict[str, Any]:
    """{'transforms': {name: {...}}, 'pcollections': {name: {...}}} for the update check."""
    comps = proto.components
    pname = _pcoll_names(comps)
    coder_cache: dict[str, str] = {}

    def coder(cid: str) -> str:
        if cid not in coder_cache:
            coder_cache[cid] = describe_coder(comps, cid)
        return coder_cache[cid]

    transforms: dict[str, dict] = {}
    for t in comps.transforms.values():
        if not t.unique_name or t.unique_name.startswith("ref_"):
            continue
        entry: dict[str, Any] = {"urn": t.spec.urn, "composite": bool(t.subtransforms)}
        if not t.subtransforms:
            side: list[str] = []
            if t.spec.urn == _PARDO:
                payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
                side = sorted(payload.side_inputs)
                if payload.state_specs:
                    entry["state"] = {n: _state_spec(comps, s) for n, s in sorted(payload.state_specs.items())}
                if payload.timer_family_specs:
                    entry["timers"] = {
                        n: f"{beam_runner_api_pb2.TimeDomain.Enum.Name(s.time_domain)}:"
                           f"{coder(s.timer_family_coder_id)}"
                        for n, s in sorted(payload.timer_family_specs.items())}
                if side:
                    entry["side_inputs"] = {tag: pname[t.inputs[tag]] for tag in side}
            entry["inputs"] = sorted(pname[p] for tag, p in t.inputs.items() if tag not in side)
            entry["outputs"] = sorted(pname[p] for p in t.outputs.values())
            if t.spec.urn == _GBK:
                ic = comps.coders[comps.pcollections[next(iter(t.inputs.values()))].coder_id]
                if ic.spec.urn == _KV:
                    entry["key_coder"] = coder(ic.component_coder_ids[0])
                    entry["value_coder"] = coder(ic.component_coder_ids[1])
        transforms[t.unique_name] = entry
    pcolls = {}
    for pid, pc in comps.pcollections.items():
        pcolls[pname[pid]] = {
            "coder": coder(pc.coder_id),
            "windowing": _windowing(comps, pc.windowing_strategy_id),
            "bounded": beam_runner_api_pb2.IsBounded.Enum.Name(pc.is_bounded),
        }
    return {"transforms": dict(sorted(transforms.items())), "pcollections": dict(sorted(pcolls.items()))}


def pickled_coders(snap: dict, allow_beam_fileio: bool = False) -> list[str]:
    """'<pcollection>: <coder>' for every PCollection whose coder pickles (or holds a pickling coder);
    the same for state cells. ``allow_beam_fileio`` leaves out Beam's fileio internals (``BEAM_UNTYPED``)."""
    bad = [f"{name}: {p['coder']}" for name, p in snap["pcollections"].items() if _pickles(p["coder"])
           and not (allow_beam_fileio and BEAM_UNTYPED.search(name))]
    for name, t in snap["transforms"].items():
        for cell, spec in t.get("state", {}).items():
            if _pickles(spec):
                bad.append(f"{name} state {cell}: {spec}")
    return sorted(bad)


def nondeterministic_keys(proto: beam_runner_api_pb2.Pipeline) -> list[str]:
    """GroupByKey and stateful-ParDo inputs whose key coder is not deterministic (Python coder objects
    answer ``is_deterministic``; standard coders are deterministic except floats and pickling ones)."""
    from apache_beam.runners.pipeline_context import PipelineContext

    comps = proto.components
    ctx = PipelineContext(comps)
    pname = _pcoll_names(comps)
    bad = []
    for t in comps.transforms.values():
        if t.subtransforms or not t.inputs:
            continue
        keyed = t.spec.urn == _GBK
        if t.spec.urn == _PARDO:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
            keyed = bool(payload.state_specs or payload.timer_family_specs)
            main = [p for tag, p in t.inputs.items() if tag not in payload.side_inputs]
        else:
            main = list(t.inputs.values())
        if not keyed or not main:
            continue
        c = comps.coders[comps.pcollections[main[0]].coder_id]
        if c.spec.urn != _KV:
            continue
        key = ctx.coders.get_by_id(c.component_coder_ids[0])
        if not key.is_deterministic():
            bad.append(f"{t.unique_name} (input {pname[main[0]]}): key coder {key!r} is not deterministic")
    return sorted(bad)
