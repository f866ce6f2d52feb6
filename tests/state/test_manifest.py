"""Step names, key coder and state/timer specs of ComputeAggregates match the checked-in manifest."""
from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
from apache_beam.transforms import userstate

import state
from state.spec import AggregateSpec, MetricSpec
from state.transform import MANIFEST, ComputeAggregates, _BoundedAggregateFn, _StreamingAggregateFn

CHECKED_IN = json.loads((Path(state.__file__).parent / "manifest.json").read_text())
SPEC = AggregateSpec(name="a", metrics=[MetricSpec(name="n", fn="count")])


def _specs(fn_cls):
    states, timers = userstate.get_dofn_specs(fn_cls({("p", "a"): SPEC}, "x", lambda: 0.0))
    return ({s.name: type(s.coder).__name__ for s in states},
            {t.name.removeprefix("ts-"): t.time_domain for t in timers})  # Beam prefixes timer names with "ts-"


def test_manifest_constant_matches_checked_in_file():
    assert MANIFEST == CHECKED_IN


def test_state_and_timer_specs_match_manifest():
    states, timers = _specs(_StreamingAggregateFn)
    assert set(states) == set(CHECKED_IN["state"]) and set(states.values()) == {"BytesCoder"}
    assert {n: str(d) for n, d in timers.items()} == {n: d for n, d in CHECKED_IN["timers"].items()}
    b_states, b_timers = _specs(_BoundedAggregateFn)
    assert b_states == states and set(b_timers) <= set(timers)  # the bounded variant is a subset


def test_step_labels_and_key_coder_in_pipeline():
    p = beam.Pipeline()
    from flatten.records import AggregateInput
    pc = p | "Src" >> beam.Create([AggregateInput("p", "a", "k", "e", 0, b"{}")])
    _ = pc | "Aggregate" >> ComputeAggregates({("p", "a"): SPEC})
    labels = set()
    coders = {}

    class V(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node):
            labels.add(node.full_label)

        def visit_transform(self, node):
            labels.add(node.full_label)
            if "/AggregatePerKey/" in node.full_label:
                coders["key"] = node.inputs[0].element_type

    p.visit(V())
    for step in CHECKED_IN["steps"]:
        assert f"Aggregate/{step}" in labels
    key_coder = beam.coders.registry.get_coder(coders["key"]).key_coder()
    assert key_coder.is_deterministic()
    assert "StrUtf8Coder" in repr(key_coder)
