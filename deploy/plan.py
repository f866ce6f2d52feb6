"""`headwater deploy plan`: will an in-place Dataflow update of this job work, and with which mapping?

The new job is built offline (``deploy.dataflow.job.dry_run``) and described as a *snapshot*
(``deploy.graph.snapshot`` plus what the contract says about state: aggregate layouts, dedup
window); the snapshot recorded at the job's last deploy is the *baseline*. ``compare`` gives one verdict:

* ``new job`` (exit 0): no baseline;
* ``compatible`` (exit 0): every old step exists under its name, no coder, state/timer spec,
  windowing/trigger or side input changed;
* ``compatible with mapping`` (exit 3): the same after ``transform_name_mapping`` (renames from
  ``deploy/manifest/name_mapping.json``, prefix semantics as Dataflow's; removed steps mapped to ``""``);
* ``incompatible: drain and replace`` (exit 4): anything Dataflow's update check rejects or that would
  silently misread state: a changed coder of a PCollection, GroupByKey, state cell or timer, changed
  windowing or trigger, changed side inputs, a step that looks renamed without a mapping entry, a
  streaming/batch switch, or aggregate edits that pre-layout state cannot migrate.

Contract edits that the graph does not show are classified from the contract summary: adding or
removing metrics, windows or aggregates is compatible because aggregate state is versioned
(``state.aggregate.migrate``); a dedup-window change keeps existing flags' old expiry.
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Mapping, NamedTuple, Optional, Sequence, TextIO

from ingest.contract import Contract

__all__ = ["Verdict", "SNAPSHOT_FORMAT", "build_snapshot", "contract_summary", "compare", "apply_mapping",
           "render", "EXIT_CODES", "NEW_JOB", "COMPATIBLE", "WITH_MAPPING", "INCOMPATIBLE"]

SNAPSHOT_FORMAT = 1
NEW_JOB = "new job"
COMPATIBLE = "compatible"
WITH_MAPPING = "compatible with mapping"
INCOMPATIBLE = "incompatible: drain and replace"
EXIT_CODES = {NEW_JOB: 0, COMPATIBLE: 0, WITH_MAPPING: 3, INCOMPATIBLE: 4}


class Verdict(NamedTuple):
    verdict: str
    reasons: list[str]  # why incompatible (each names a step or PCollection), empty otherwise
    mapping: dict[str, str]  # transform_name_mapping to pass to the update
    notes: list[str]  # what changed that is safe, and what it means

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "exit_code": self.exit_code, "reasons": self.reasons,
                "transform_name_mapping": self.mapping, "notes": self.notes}


# ---------------------------------------------------------------- snapshot


def contract_summary(contract: Contract) -> dict[str, Any]:
    """What the verdict needs from the contract beyond the graph (state layouts, dedup window)."""
    from state.aggregate import LAYOUT_VERSION, layout_of

    return {
        "state_layout_version": LAYOUT_VERSION,
        "aggregates": {f"{p.name}/{a.name}": layout_of(a) for p in contract.partners for a in p.aggregates},
        "dedup_window_s": contract.dedup.window_s(),
        "partners": sorted(p.name for p in contract.partners),
    }


def build_snapshot(contract: Contract, job_name: str, argv: Sequence[str] = (), image: Optional[str] = None):
    """(snapshot document, DryRun) of the job as Dataflow would get it. Offline."""
    import apache_beam

    from deploy.dataflow.job import dry_run
    from deploy.graph import snapshot

    dry = dry_run(contract, job_name, argv, image)
    from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions, WorkerOptions

    doc = {
        "format": SNAPSHOT_FORMAT,
        "job_name": job_name,
        "job_id": None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "beam_version": apache_beam.__version__,
        "streaming": bool(dry.options.view_as(StandardOptions).streaming),
        "image": dry.options.view_as(WorkerOptions).sdk_container_image,
        "project": dry.options.view_as(GoogleCloudOptions).project,
        "region": dry.options.view_as(GoogleCloudOptions).region,
        "contract": contract_summary(contract),
        "graph": snapshot(dry.proto),
    }
    return doc, dry


# ---------------------------------------------------------------- mapping


def apply_mapping(name: str, mapping: Mapping[str, str]) -> Optional[str]:
    """Dataflow's prefix semantics: the longest key equal to ``name`` or a ``/``-prefix of it renames it
    (``""``: removed). None when no key applies."""
    best = None
    for k in mapping:
        if (name == k or name.startswith(k + "/")) and (best is None or len(k) > len(best)):
            best = k
    if best is None:
        return None
    target = mapping[best]
    return "" if target == "" else target + name[len(best):]


def _top_level(names: set[str]) -> list[str]:
    """The names none of whose ``/``-ancestors is in the set (one mapping entry per removed subtree)."""
    out = []
    for n in sorted(names):
        parts = n.split("/")
        if not any("/".join(parts[:i]) in names for i in range(1, len(parts))):
            out.append(n)
    return out


# ---------------------------------------------------------------- compare


def _signature(t: dict) -> tuple:
    return (t.get("urn"), json.dumps(t.get("state", {}), sort_keys=True), json.dumps(t.get("timers", {}), sort_keys=True),
            t.get("key_coder"), t.get("value_coder"))


def _leaf_diffs(name: str, old: dict, new: dict) -> list[str]:
    out = []
    for what in ("state", "timers"):
        a, b = old.get(what, {}), new.get(what, {})
        for cell in sorted(set(a) | set(b)):
            if a.get(cell) != b.get(cell):
                if cell not in b:
                    out.append(f"step {name!r}: {what[:-1] if what == 'timers' else 'state cell'} {cell!r} removed "
                               f"({a[cell]})")
                elif cell not in a:
                    out.append(f"step {name!r}: {what[:-1] if what == 'timers' else 'state cell'} {cell!r} added "
                               f"({b[cell]})")
                else:
                    out.append(f"step {name!r}: {'timer' if what == 'timers' else 'state cell'} {cell!r} coder "
                               f"changed: {a[cell]} -> {b[cell]}")
    for what in ("key_coder", "value_coder"):
        if old.get(what) != new.get(what):
            out.append(f"GroupByKey {name!r}: {what.replace('_', ' ')} changed: {old.get(what)} -> {new.get(what)}")
    if old.get("side_inputs", {}).keys() != new.get("side_inputs", {}).keys():
        out.append(f"step {name!r}: side inputs changed: {sorted(old.get('side_inputs', {}))} -> "
                   f"{sorted(new.get('side_inputs', {}))}")
    if old.get("urn") != new.get("urn"):
        out.append(f"step {name!r}: kind changed: {old.get('urn')} -> {new.get('urn')}")
    return out


def _pcoll_diffs(name: str, old: dict, new: dict) -> list[str]:
    out = []
    if old["coder"] != new["coder"]:
        out.append(f"PCollection {name!r}: coder changed: {old['coder']} -> {new['coder']}")
    if old["windowing"] != new["windowing"]:
        changed = sorted(k for k in old["windowing"] if old["windowing"][k] != new["windowing"].get(k))
        out.append(f"PCollection {name!r}: windowing changed ({', '.join(changed)}): "
                   + "; ".join(f"{k} {old['windowing'][k]} -> {new['windowing'].get(k)}" for k in changed))
    return out


def _aggregate_notes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(incompatible reasons, notes) for aggregate edits, from the contract summaries."""
    reasons, notes = [], []
    old_aggs, new_aggs = old.get("aggregates", {}), new.get("aggregates", {})
    versioned = old.get("state_layout_version", 1) >= 2
    for name in sorted(set(old_aggs) - set(new_aggs)):
        notes.append(f"aggregate {name} removed: its keys' state and timers are cleared when their next timer fires")
    for name in sorted(set(new_aggs) - set(old_aggs)):
        notes.append(f"aggregate {name} added: starts empty")
    for name in sorted(set(old_aggs) & set(new_aggs)):
        a, b = old_aggs[name], new_aggs[name]
        if a == b:
            continue
        ma, mb = [tuple(m) for m in a[2]], [tuple(m) for m in b[2]]
        added = [m[0] for m in mb if m not in ma]
        removed = [m[0] for m in ma if m not in mb]
        wa, wb = a[5], b[5]
        edits = []
        if added:
            edits.append(f"metrics added {added} (start empty)")
        if removed:
            edits.append(f"metrics removed {removed} (dropped)")
        if [w for w in wb if w not in wa]:
            edits.append(f"windows added {[w for w in wb if w not in wa]} (filled from the buckets held)")
        if [w for w in wa if w not in wb]:
            edits.append(f"windows removed {[w for w in wa if w not in wb]}")
        if a[4] != b[4]:
            edits.append(f"bucket {a[4]} us -> {b[4]} us ("
                         + ("exact merge" if a[4] and b[4] and b[4] % a[4] == 0 else "old buckets count where they start")
                         + ")")
        if a[1] != b[1]:
            edits.append(f"key {a[1]!r} -> {b[1]!r} (accumulators restart)")
        if a[3] != b[3]:
            edits.append(f"hll_precision {a[3]} -> {b[3]} (sketches restart)")
        if a[6:] != b[6:]:
            edits.append("ttl changed (next deadline per key)")
        if not versioned and ma != mb and ma != mb[:len(ma)] and mb != ma[:len(mb)]:
            reasons.append(f"aggregate {name}: state was written before versioned layouts (positional); "
                           f"metrics {[m[0] for m in ma]} -> {[m[0] for m in mb]} is not an append or a removal "
                           "at the end, so old state cannot be mapped")
        notes.append(f"aggregate {name}: " + "; ".join(edits or ["spec changed"])
                     + " - compatible: state migrates on first touch (layout v2)")
    oa, na = old.get("dedup_window_s"), new.get("dedup_window_s")
    if oa is not None and na is not None and oa != na:
        notes.append(f"dedup window {oa:g}s -> {na:g}s: compatible (same state and timers); ids seen before the "
                     "update keep their old expiry")
    return reasons, notes


def compare(old: Optional[dict], new: dict, renames: Optional[Mapping[str, str]] = None) -> Verdict:
    """The verdict for replacing the job snapshotted in ``old`` by ``new``.

    ``renames``: the checked-in name mapping (old prefix -> new prefix); entries that apply to ``old``
    go into the generated mapping, as does every removed step (mapped to ``""``).
    """
    if old is None:
        return Verdict(NEW_JOB, [], {}, ["no baseline snapshot: launch it as a new job"])
    if old.get("format") != SNAPSHOT_FORMAT:
        return Verdict(INCOMPATIBLE, [f"baseline snapshot format {old.get('format')!r} is not {SNAPSHOT_FORMAT}"], {}, [])
    reasons: list[str] = []
    notes: list[str] = []
    if old.get("streaming") != new.get("streaming"):
        reasons.append(f"job type changes from {'streaming' if old.get('streaming') else 'batch'} to "
                       f"{'streaming' if new.get('streaming') else 'batch'}")
    if not new.get("streaming"):
        reasons.append("batch jobs cannot be updated in place (Dataflow updates streaming jobs only)")
    renames = dict(renames or {})
    ot, nt = old["graph"]["transforms"], new["graph"]["transforms"]
    op, np_ = old["graph"]["pcollections"], new["graph"]["pcollections"]
    used = {k: v for k, v in renames.items() if any(n == k or n.startswith(k + "/") for n in ot)}
    for k, v in used.items():
        if v and not any(n == v or n.startswith(v + "/") for n in nt):
            reasons.append(f"name mapping {k!r} -> {v!r}: no step {v!r} in the new job")
    target: dict[str, str] = {}
    missing: set[str] = set()
    for name in ot:
        mapped = apply_mapping(name, used)
        dest = name if mapped is None else mapped
        if dest == "":
            continue  # removed on purpose by the checked-in mapping
        if dest in nt:
            target[name] = dest
        else:
            missing.add(name)
    matched_new = set(target.values())
    unmatched_new = {n: t for n, t in nt.items() if n not in matched_new}
    for name in sorted(missing):
        t = ot[name]
        if t.get("composite"):
            continue
        if t.get("state") or t.get("timers") or t.get("key_coder"):
            twins = [n for n, u in unmatched_new.items() if not u.get("composite") and _signature(u) == _signature(t)]
            if twins:
                reasons.append(f"step {name!r} looks renamed to {twins[0]!r} (same state, timers and coders) but "
                               "deploy/manifest/name_mapping.json has no entry: add one, or its state is dropped")
    removed = _top_level(missing)
    mapping = dict(used)
    for name in removed:
        mapping[name] = ""
    if removed:
        stateful_gone = sorted(n for n in missing if ot[n].get("state") or ot[n].get("timers"))
        notes.append(f"{len(missing)} steps removed ({', '.join(removed)}), mapped to \"\""
                     + (f"; their state is dropped: {', '.join(stateful_gone)}" if stateful_gone else ""))
    for name, dest in sorted(target.items()):
        if not ot[name].get("composite") and not nt[dest].get("composite"):
            reasons += _leaf_diffs(name if name == dest else f"{name} -> {dest}", ot[name], nt[dest])
    for pname, p in sorted(op.items()):
        producer, _, tag = pname.rpartition(".")
        if producer not in target:
            continue
        dest = f"{target[producer]}.{tag}"
        if dest in np_:
            reasons += _pcoll_diffs(pname if dest == pname else f"{pname} -> {dest}", p, np_[dest])
        elif producer not in missing:
            reasons.append(f"PCollection {pname!r}: output {tag!r} no longer produced by {target[producer]!r}")
    added = _top_level(set(unmatched_new))
    if added:
        notes.append(f"{len(unmatched_new)} steps added: {', '.join(added)}")
    agg_reasons, agg_notes = _aggregate_notes(old.get("contract", {}), new.get("contract", {}))
    reasons += agg_reasons
    notes += agg_notes
    if old.get("image") != new.get("image"):
        notes.append(f"worker image {old.get('image')} -> {new.get('image')}")
    if reasons:
        return Verdict(INCOMPATIBLE, reasons, mapping, notes)
    if mapping:
        return Verdict(WITH_MAPPING, [], mapping, notes)
    return Verdict(COMPATIBLE, [], {}, notes)


def render(v: Verdict, job_name: str, out: TextIO) -> None:
    out.write(f"job {job_name}: {v.verdict}\n")
    for r in v.reasons:
        out.write(f"  incompatible: {r}\n")
    if v.mapping:
        out.write("  transform_name_mapping:\n")
        out.write("    " + json.dumps(v.mapping, indent=1, sort_keys=True).replace("\n", "\n    ") + "\n")
    for n in v.notes:
        out.write(f"  note: {n}\n")
    if v.verdict == INCOMPATIBLE:
        out.write("  next: drain the running job, then launch this one as a new job (docs/deploy.md)\n")
    elif v.verdict == WITH_MAPPING:
        out.write("  next: headwater deploy update passes this mapping with --update\n")
