"""deploy.plan.compare on small snapshots: each kind of change Dataflow's update check cares about."""
from __future__ import annotations

import copy

import pytest

from deploy.plan import COMPATIBLE, INCOMPATIBLE, NEW_JOB, SNAPSHOT_FORMAT, WITH_MAPPING, apply_mapping, compare

WIN = {"window_fn": "beam:window_fn:global_windows:v1", "window_coder": "global_window", "trigger": "default { }",
       "accumulation": "DISCARDING", "allowed_lateness_ms": 0, "merge_status": "NON_MERGING",
       "output_time": "END_OF_WINDOW", "closing_behavior": "EMIT_IF_NONEMPTY"}
ROW = "row{partner:STRING, event_id:STRING}"


def _snap() -> dict:
    t = {
        "A": {"urn": "c", "composite": True},
        "A/Read": {"urn": "beam:transform:impulse:v1", "composite": False, "inputs": [], "outputs": ["A/Read.None"]},
        "A/Key": {"urn": "beam:transform:pardo:v1", "composite": False, "inputs": ["A/Read.None"],
                  "outputs": ["A/Key.None"]},
        "A/State": {"urn": "beam:transform:pardo:v1", "composite": False, "inputs": ["A/Key.None"],
                    "outputs": ["A/State.None"], "state": {"seen": "read_modify_write_spec:bool"},
                    "timers": {"ts-expiry": "EVENT_TIME:timer<string_utf8, global_window>"}},
        "A/Group": {"urn": "beam:transform:group_by_key:v1", "composite": False, "inputs": ["A/State.None"],
                    "outputs": ["A/Group.None"], "key_coder": "string_utf8", "value_coder": ROW},
    }
    p = {name + ".None": {"coder": f"kv<string_utf8, {ROW}>" if name != "A/Read" else "bytes",
                          "windowing": dict(WIN), "bounded": "UNBOUNDED"}
         for name in ("A/Read", "A/Key", "A/State", "A/Group")}
    return {"format": SNAPSHOT_FORMAT, "streaming": True, "image": "img:1", "graph": {"transforms": t, "pcollections": p},
            "contract": {"state_layout_version": 2, "aggregates": {}, "dedup_window_s": 86400.0}}


def test_no_baseline_is_a_new_job_and_same_is_compatible():
    assert compare(None, _snap()).verdict == NEW_JOB
    v = compare(_snap(), _snap())
    assert (v.verdict, v.exit_code, v.reasons, v.mapping) == (COMPATIBLE, 0, [], {})


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s["graph"]["pcollections"]["A/Key.None"].update(coder="kv<string_utf8, python:FastPrimitivesCoder>"),
     "PCollection 'A/Key.None': coder changed"),
    (lambda s: s["graph"]["pcollections"]["A/State.None"]["windowing"].update(trigger="after_processing_time { }"),
     "PCollection 'A/State.None': windowing changed (trigger)"),
    (lambda s: s["graph"]["transforms"]["A/State"]["state"].update(seen="read_modify_write_spec:varint"),
     "step 'A/State': state cell 'seen' coder changed"),
    (lambda s: s["graph"]["transforms"]["A/State"]["state"].update(count="bag_spec:varint"),
     "step 'A/State': state cell 'count' added"),
    (lambda s: s["graph"]["transforms"]["A/State"]["timers"].pop("ts-expiry"),
     "step 'A/State': timer 'ts-expiry' removed"),
    (lambda s: s["graph"]["transforms"]["A/Group"].update(key_coder="varint"),
     "GroupByKey 'A/Group': key coder changed"),
    (lambda s: s["graph"]["transforms"]["A/Key"].update(side_inputs={"side0": "B/View.None"}),
     "step 'A/Key': side inputs changed"),
    (lambda s: s.update(streaming=False), "job type changes from streaming to batch"),
])
def test_each_update_breaking_change_is_incompatible_and_named(edit, expected):
    new = _snap()
    edit(new)
    v = compare(_snap(), new)
    assert v.verdict == INCOMPATIBLE and v.exit_code == 4
    assert any(r.startswith(expected) for r in v.reasons), v.reasons


def test_removed_subtree_is_mapped_to_empty_once():
    new = _snap()
    for name in ("A/Group",):
        del new["graph"]["transforms"][name]
        del new["graph"]["pcollections"][name + ".None"]
    v = compare(_snap(), new)
    assert v.verdict == WITH_MAPPING and v.exit_code == 3 and v.mapping == {"A/Group": ""}


def test_renamed_composite_with_mapping_renames_every_step_and_pcollection():
    new = _snap()
    ren = lambda n: n.replace("A", "B", 1)  # noqa: E731
    new["graph"]["transforms"] = {ren(k): v for k, v in new["graph"]["transforms"].items()}
    new["graph"]["pcollections"] = {ren(k): v for k, v in new["graph"]["pcollections"].items()}
    assert compare(_snap(), new, {"A": "B"}).verdict == WITH_MAPPING
    assert compare(_snap(), new, {"A": "B"}).mapping == {"A": "B"}
    v = compare(_snap(), new)  # without the entry: the stateful step is recognised as renamed
    assert v.verdict == INCOMPATIBLE and any("looks renamed to 'B/State'" in r for r in v.reasons)
    bad = compare(_snap(), new, {"A": "C"})
    assert any("no step 'C' in the new job" in r for r in bad.reasons)


def test_prefix_mapping_semantics():
    m = {"A": "B", "A/Deep": "", "X/Y": "Z"}
    assert apply_mapping("A", m) == "B" and apply_mapping("A/Key", m) == "B/Key"
    assert apply_mapping("A/Deep/Inner", m) == "" and apply_mapping("AB", m) is None
    assert apply_mapping("X/Y/Q", m) == "Z/Q" and apply_mapping("X", m) is None


def _with_agg(metrics, version=2):
    s = _snap()
    s["contract"]["state_layout_version"] = version
    s["contract"]["aggregates"] = {"p/a": [2, "user_id", [list(m) for m in metrics], 12, None, ["lifetime"], 1]}
    return s


def test_aggregate_edits_are_notes_when_state_is_versioned_and_reasons_when_it_was_positional():
    old_m = [("n", "count", None), ("s", "sum", "x")]
    reordered = [("s", "sum", "x"), ("m", "max", "x"), ("n", "count", None)]
    v = compare(_with_agg(old_m), _with_agg(reordered))
    assert v.verdict == COMPATIBLE and any("metrics added ['m']" in n for n in v.notes)
    v = compare(_with_agg(old_m, version=1), _with_agg(reordered))
    assert v.verdict == INCOMPATIBLE and "written before versioned layouts" in v.reasons[0]
    appended = old_m + [("m", "max", "x")]
    assert compare(_with_agg(old_m, version=1), _with_agg(appended)).verdict == COMPATIBLE


def test_batch_jobs_are_never_updated_in_place():
    old, new = _snap(), _snap()
    old["streaming"] = new["streaming"] = False
    v = compare(old, new)
    assert v.verdict == INCOMPATIBLE and "batch jobs cannot be updated in place" in v.reasons[0]


def test_unknown_snapshot_format_is_refused():
    old = copy.deepcopy(_snap())
    old["format"] = 99
    assert compare(old, _snap()).verdict == INCOMPATIBLE
