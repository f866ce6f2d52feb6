"""sinks.warehouse_reader: the AggregateInputs read back from the warehouse are the ones the stream built.

The real pipeline writes a DuckDB file (and the BigQuery emulator) from events with TIMESTAMP, DATE,
NUMERIC, REPEATED, BOOL columns, a value moved to a variant column (schema_mode evolve), a key column
and a partner in freeze mode whose conflicting row the sink rejects (the stream aggregated it anyway).
The inputs read back must equal, byte for byte, the AggregateInputs FlattenEvents produced; the
recomputation from them must equal the latest aggregate rows exactly.
"""
from __future__ import annotations

import json

import apache_beam as beam
import orjson
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from flatten.records import RawMessage
from ingest.contract import parse_contract
from ingest.dedup import DropDuplicateEvents
from ingest.flatten_step import AGGREGATE_TAG, FlattenEvents
from ingest.parse import ParseEnvelope
from ingest.pipeline import build
from sinks.warehouse_reader import (aggregate_inputs_from_warehouse, latest_aggregate_rows, latest_aggregates,
                                    specs_of)
from state.recompute import recompute
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)

AGGS = [
    {"name": "activity", "windows": ["lifetime", "1d"], "distinct_exact_threshold": 5,
     "metrics": [{"name": "n", "fn": "count"}, {"name": "spend", "fn": "sum", "column": "amount"},
                 {"name": "top", "fn": "max", "column": "amount"},
                 {"name": "days", "fn": "distinct", "column": "day"},
                 {"name": "flags", "fn": "distinct", "column": "flag"},
                 {"name": "tags", "fn": "distinct", "column": "tags"},
                 {"name": "seen", "fn": "latest", "column": "seen_at"},
                 {"name": "big", "fn": "latest", "column": "big"},
                 {"name": "first", "fn": "first_seen"}]},
    {"name": "per_shop", "key": "shop__id", "windows": ["lifetime"],
     "metrics": [{"name": "n", "fn": "count"}, {"name": "users", "fn": "distinct", "column": "_user_id"}]},
]


def contract_for(warehouse: dict, modes=("evolve", "freeze")) -> object:
    return parse_contract(raw_contract(warehouse, modes))


def raw_contract(warehouse: dict, modes=("evolve", "freeze")) -> dict:
    return ({
        "warehouse": warehouse,
        "masking": {"allow_dev_key": True},
        "partners": [{
            "name": name,
            "sources": [{"kind": "file", "pattern": f"/nonexistent/{name}/*.jsonl"}],
            "envelope": {"event_id": "id", "user_id": "user.id", "event_time": "ts"},
            "flatten": {"schema_mode": mode},
            "table": {"name": f"{name}_events"},
            "aggregates": AGGS,
        } for name, mode in zip(("evo", "frz"), modes)],
    })


def write_warehouse(contract, evs) -> None:
    """Run the whole pipeline (FnApiRunner) over ``evs`` for both partners into the contract's warehouse."""
    _write(contract, evs)


def events(n: int = 120) -> list[dict]:
    out = []
    for i in range(n):
        ev = {"id": f"e{i}", "ts": f"2026-03-{1 + i % 9:02d}T{i % 24:02d}:{i % 60:02d}:00.{i:06d}Z",
              "user": {"id": f"u{i % 13}"}, "amount": round(i * 1.25 + 0.5, 2) if i % 11 else None,
              "day": f"2026-02-{1 + i % 20:02d}", "flag": bool(i % 3), "tags": [f"t{i % 4}", f"t{i % 7}"],
              "seen_at": f"2026-04-01T10:00:{i % 60:02d}+02:00", "big": 10**20 + i}
        if i % 5:
            ev["shop"] = {"id": i % 6}
        out.append(ev)
    out[40]["amount"] = "n/a"  # FLOAT64 column, STRING value: variant column (evolve) / rejected row (freeze)
    out[41]["user"] = {"id": "u1"}
    return out


def _messages(partner: str, evs: list[dict]) -> list[RawMessage]:
    return [RawMessage(partner=partner, source="file", coords=f"file:x:{i}", payload=json.dumps(e).encode(),
                       attributes=b"{}", source_time_us=1_770_000_000_000_000 + i) for i, e in enumerate(evs)]


def _overrides(evs):
    return {f"Read_{p}_file_0": beam.Create(_messages(p, evs)) for p in ("evo", "frz")}


class _Collect(beam.DoFn):
    SEEN: list = []

    def process(self, x):
        _Collect.SEEN.append(x)


def stream_inputs(contract, evs) -> list:
    """The AggregateInputs the pipeline's own FlattenEvents builds for these events."""
    _Collect.SEEN = []
    with TestPipeline(runner="FnApiRunner") as p:
        msgs = [p | f"Read{n}" >> beam.Create(_messages(n, evs)) for n in ("evo", "frz")]
        parsed = msgs | "All" >> beam.Flatten() | "ParseEnvelope" >> ParseEnvelope(contract)
        flat = parsed.events | "Dedup" >> DropDuplicateEvents() | "FlattenEvents" >> FlattenEvents(contract)
        _ = flat[AGGREGATE_TAG] | "Collect" >> beam.ParDo(_Collect())
    return list(_Collect.SEEN)


def _write(contract, evs) -> None:
    with TestPipeline(runner="FnApiRunner") as p:
        build(p, contract, source_overrides=_overrides(evs), require_overrides=True)


def _check(contract, evs) -> None:
    got = list(aggregate_inputs_from_warehouse(contract))
    want = stream_inputs(contract, evs)
    assert len(want) > 200
    assert sorted(got) == sorted(want)
    for p in ("evo", "frz"):  # per partner, (event time, event id) order
        mine = [(i.event_time_us, i.event_id) for i in got if i.partner == p]
        assert mine == sorted(mine)
    expected = recompute(specs_of(contract), got,
                         {k: v.watermark_us for k, v in latest_aggregate_rows(contract).items()})
    found = {k: m for k, (m, _v) in latest_aggregates(contract).items()}
    assert len(found) > 50 and expected == found
    assert any(m["days"] > 5 for k, m in found.items() if k[1] == "activity")  # HLL estimates included
    # --partner and --since filters
    only = list(aggregate_inputs_from_warehouse(contract, partner="frz"))
    assert sorted(only) == sorted(i for i in want if i.partner == "frz")
    cut = sorted({i.event_time_us for i in want})[len(want) // 4]
    assert sorted(aggregate_inputs_from_warehouse(contract, since_us=cut)) == sorted(
        i for i in want if i.event_time_us >= cut)


def test_duckdb_inputs_equal_the_streams_and_recompute_equals_the_aggregates(tmp_path):
    contract = contract_for({"kind": "duckdb", "path": str(tmp_path / "wh.duckdb")})
    evs = events()
    _write(contract, evs)
    import duckdb

    con = duckdb.connect(str(tmp_path / "wh.duckdb"), read_only=True)
    cols = {c[0] for c in con.execute("DESCRIBE evo_events").fetchall()}
    rejected = con.execute("SELECT count(*) FROM dead_letters WHERE source = 'warehouse'").fetchone()[0]
    con.close()
    assert "amount__v_string" in cols and rejected == 1  # both paths are exercised
    _check(contract, evs)


@pytest.mark.integration
def test_bigquery_emulator_inputs_equal_the_streams(cloud_services):
    contract = contract_for({"kind": "bigquery", "project": "headwater-local", "dataset": unique_id("verify"),
                             "endpoint": cloud_services.bigquery,
                             "bigquery": {"max_attempts": 2, "initial_backoff_s": 0.05, "request_timeout_s": 60}})
    evs = events()
    _write(contract, evs)
    _check(contract, evs)
