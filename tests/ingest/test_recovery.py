"""ingest.recovery: a restarted local job resumes from the warehouse (DuckDB), without a runner.

The warehouse is filled by the real pipeline (FnApiRunner, in-memory sources); then a "kill" is
simulated by deleting the latest aggregate rows of some keys (the job died after writing those events'
rows, before emitting their aggregates). ``prepare_recovery`` must bring the aggregates table back to a
plain recomputation from the rows at once, with versions above the old ones, hand the stateful DoFn
exactly the folded state of every key, and seed dedup with every event id of the live partners.
"""
from __future__ import annotations

import os

import pickle

import apache_beam as beam
import duckdb
import orjson
from apache_beam.testing.test_pipeline import TestPipeline

from flatten.records import RawMessage
from ingest.contract import parse_contract
from ingest.dedup import dedup_key
from ingest.pipeline import build
from ingest.recovery import prepare_recovery
from sinks.warehouse_reader import aggregate_inputs_from_warehouse, latest_aggregate_rows, specs_of
from state import aggregate as A
from state.recompute import fold_states, recompute


def _contract(tmp_path):
    return parse_contract({
        "warehouse": {"kind": "duckdb", "path": str(tmp_path / "wh.duckdb")},
        "partners": [{
            "name": "live",
            "sources": [{"kind": "kafka", "topics": ["t"], "group_id": "g"}],
            "envelope": {"event_id": "id", "user_id": "user", "event_time": "ts"},
            "table": {"name": "live_events"},
            "aggregates": [{"name": "activity", "windows": ["lifetime", "1d"], "emit_every": "5s",
                            "metrics": [{"name": "n", "fn": "count"},
                                        {"name": "spend", "fn": "sum", "column": "amount"}]}],
        }],
    })


def _messages(n: int) -> list[RawMessage]:
    out = []
    for i in range(n):
        doc = {"id": f"e{i}", "user": f"u{i % 7}", "ts": f"2026-03-01T10:{i % 60:02d}:00Z", "amount": i * 0.5}
        out.append(RawMessage("live", "kafka", f"kafka:t/0@{i}", orjson.dumps(doc), b"{}", 0))
    return out


def test_restart_rebuilds_state_seeds_dedup_and_repairs_lagging_aggregates(tmp_path):
    contract = _contract(tmp_path)
    with TestPipeline(runner="FnApiRunner") as p:
        build(p, contract, source_overrides={"Read_live_kafka_0": beam.Create(_messages(70))},
              require_overrides=True)
    before = latest_aggregate_rows(contract)
    top_before = max(r.version for r in before.values())
    con = duckdb.connect(contract.warehouse.path)
    try:  # the job "died" before any of u1's and u2's aggregates were emitted, and before u3's lifetime row
        con.execute("DELETE FROM aggregates WHERE key IN ('u1', 'u2') OR (key = 'u3' AND \"window\" = 'lifetime')")
    finally:
        con.close()
    stale = latest_aggregate_rows(contract)
    assert ("live", "activity", "u1", "lifetime") not in stale and ("live", "activity", "u3", "1d") in stale

    rec = prepare_recovery(contract)

    latest = latest_aggregate_rows(contract)
    want = recompute(specs_of(contract), aggregate_inputs_from_warehouse(contract),
                     as_of={k: v.watermark_us for k, v in latest.items()})
    assert {k: v.metrics for k, v in latest.items()} == want  # exact again, before the job even starts
    assert rec.repaired >= 5  # u1 and u2: both windows; u3: lifetime
    u3 = stale[("live", "activity", "u3", "1d")].version
    assert latest[("live", "activity", "u3", "lifetime")].version > u3  # above the key's highest version
    with open(rec.seen.path, "rb") as fh:
        assert pickle.load(fh) == {dedup_key("live", f"e{i}") for i in range(70)}
    with open(rec.states.path, "rb") as fh:
        seeds = pickle.load(fh)
    folded = fold_states(specs_of(contract), aggregate_inputs_from_warehouse(contract))
    assert set(seeds) == set(folded) == {("live", "activity", f"u{i}") for i in range(7)}
    for key, raw in seeds.items():
        st = A.AggState.from_bytes(raw)
        assert st.lifetime == folded[key].lifetime and st.clock_us == folded[key].clock_us
        # the next row the stream emits for the key continues above every version in the table
        assert st.version >= max(v.version for (p, a, k, w), v in latest.items() if (p, a, k) == key)
        assert not st.dirty  # its current values are in the table: nothing to emit until a new event
    assert max(r.version for r in latest.values()) >= top_before
    # the snapshots are the job's start-up input: gone when the job ends (ingest.pipeline._end_local_job)
    folder = os.path.dirname(rec.seen.path)
    assert os.path.dirname(rec.states.path) == folder and os.path.basename(folder).startswith(
        f"headwater-recovery-{os.getpid()}-")
    from ingest.pipeline import _end_local_job

    _end_local_job(stop_runner=False)
    assert not os.path.exists(folder)


def test_a_first_start_has_nothing_to_resume(tmp_path):
    rec = prepare_recovery(_contract(tmp_path))
    assert rec.seen is None and rec.states is None and rec.repaired == 0
