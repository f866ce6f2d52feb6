"""The batched live steps (ingest.live_batches): per-shard aggregates equal the per-key step and the backfill.

The dedup shard runs every DropDuplicateEvents semantics test in tests/ingest/test_dedup.py (fixture ``local``:
"batched", "batched-replayed"). Here: the aggregate shard on the stream of tests/state/test_equivalence.py
(late data within the lateness, processing-time emissions, closes, TTL), kept in memory or replayed from its
Beam state log at every bundle; and the shard's timer bookkeeping on its own. The whole batched job on Prism
is exercised by tests/state/test_streaming_prism.py and the tests/ingest streaming tests (kills included).
"""
from __future__ import annotations

import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from ingest import live_batches
from ingest.live_batches import _AggShard
from state.transform import ComputeAggregates
from tests.ingest.test_dedup import _aggregate
from tests.state.reference import Ev, final_rows
from tests.state.streamkit import SINK, Collect, FixedClock, bounded, inp, plain, streaming_options
from tests.state.test_equivalence import SPEC, SPECS, _events, _finals, _stream


def test_a_shard_fires_each_key_timer_once_in_time_order_with_its_own_time():
    sh = _AggShard()
    a, b = ("p", "agg", "a"), ("p", "agg", "b")
    sh.set_timer(a, "close", 50)
    sh.set_timer(b, "close", 20)
    sh.set_timer(a, "probe", 10)
    sh.set_timer(a, "probe", 30)  # moved: the 10 entry is stale
    sh.set_timer(b, "ttl", 40)
    sh.set_timer(b, "ttl", None)  # cleared
    sh.set_timer(a, "emit", 5)
    assert sh.earliest(sh.wm) == 20 and sh.earliest(sh.rt) == 5
    fired = []
    while (nxt := sh.due(sh.wm, 40)) is not None:
        fired.append(nxt)
    assert fired == [(20, "close", b), (30, "probe", a)]
    assert sh.earliest(sh.wm) == 50 and sh.due(sh.wm, 49) is None
    assert sh.due(sh.wm, None) == (50, "close", a) and sh.earliest(sh.wm) is None
    assert sh.timers == {a: {"emit": 5}}


@pytest.mark.parametrize("replayed", [False, True], ids=["in-memory", "replayed-from-state"])
def test_batched_aggregates_equal_the_backfill_and_the_reference(replayed, monkeypatch):
    """test_equivalence's stream (events arrive in slices, 20 % a slice late, processing-time emissions) through
    the aggregate shards; the final row of every (key, window) equals the bounded job's and the reference.
    ``replayed``: nothing is kept in memory between bundles, every bundle replays its shard's Beam state log."""
    if replayed:
        monkeypatch.setattr(live_batches, "hold", lambda *a: None)
    events = _events()
    SINK.clear()
    local = (True, uuid.uuid4().hex)
    with beam.Pipeline(options=streaming_options()) as p:
        out = p | "Events" >> _stream(events) | "Aggregate" >> _aggregate(SPECS, FixedClock(), local)
        _ = out.aggregates | "Plain" >> beam.Map(plain) | "Collect" >> beam.ParDo(Collect("stream"))
        _ = out.dead_letter | "CollectDL" >> beam.ParDo(Collect("dead"))
    # FnApiRunner, not DirectRunner: for a bounded pipeline without TestStream the DirectRunner first tries
    # Prism with Beam's default binary (a download: no network here), and that failed start stays in Beam's
    # shared Prism job server, so a later Prism pipeline in this process (tests/ingest/test_pubsub_source.py,
    # whose --prism_location is this machine's binary) got the broken server and failed
    with beam.Pipeline(options=PipelineOptions(runner="FnApiRunner")) as p:
        out = bounded(p, [inp(k, t, i, **v) for k, t, i, v in events]) | "Aggregate" >> ComputeAggregates(SPECS)
        _ = out.aggregates | "Plain" >> beam.Map(plain) | "Collect" >> beam.ParDo(Collect("backfill"))
    assert SINK.get("dead", []) == []
    stream, backfill = _finals(SINK["stream"]), _finals(SINK["backfill"])
    assert len(stream) == 2 * len({e[0] for e in events})
    assert stream == backfill
    ref = final_rows(SPEC, [Ev(k, t, f"e{i:06d}", v) for k, t, i, v in events])
    assert {kw: m["n"] for kw, (m, _) in stream.items()} == {kw: m["n"] for kw, m in ref.items()}
    # processing-time emissions happened before the finals (the cadence runs per shard, for every key)
    assert len(SINK["stream"]) > len(stream)
    # versions strictly increase per (key, window)
    by_kw: dict = {}
    for r in SINK["stream"]:
        by_kw.setdefault((r[0], r[1]), []).append(r[4])
    assert all(v == sorted(set(v)) for v in by_kw.values())
