"""Aggregates from history: a backfill's aggregates pass and ``headwater verify --repair``.

The warehouse is written by the stream's own pipeline (tests/sinks/test_warehouse_reader.py builds it:
variant columns, a sink-rejected row, HyperLogLog distinct counts, a column-keyed aggregate). A
backfill then adds February history for three users; before this pass their aggregates would
miss it (``headwater verify`` reports them). Afterwards verify is exact, the backfilled keys'
latest rows equal the recomputation, a rerun writes nothing, and planted drift is repaired by
``headwater verify --repair``.
"""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import duckdb
import orjson
import pytest
import yaml

from backfill.aggregates import recompute_aggregates, touched_keys
from backfill.runner import run_backfill
from backfill.spec import BackfillSpec, parse_instant_us
from deploy.cli import main
from deploy.verify import verify
from ingest.contract import parse_contract
from sinks.duckdb_store import open_readonly
from sinks.warehouse_reader import aggregate_inputs_from_warehouse, latest_aggregate_rows, specs_of
from state.recompute import recompute
from tests.conftest import plant_metric_drift, plant_unseen_event
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)
from tests.sinks.test_warehouse_reader import events, raw_contract, write_warehouse

FEB = parse_instant_us("2026-02-01", "t")
MAR = parse_instant_us("2026-03-01", "t")
HIST_USERS = ("u1", "u2", "u3")


def _history() -> list[dict]:
    """30 February events of u1..u3 (the stream's events are all in March)."""
    out = []
    for i in range(30):
        out.append({"id": f"h{i}", "ts": f"2026-02-{10 + i % 15:02d}T{i % 24:02d}:{i % 60:02d}:00.{i:06d}Z",
                    "user": {"id": HIST_USERS[i % 3]}, "amount": round(i * 2.5 + 1, 2),
                    "day": f"2026-01-{1 + i % 28:02d}", "flag": bool(i % 2), "tags": [f"t{i % 9}"],
                    "seen_at": f"2026-02-01T09:00:{i % 60:02d}Z", "big": 10**19 + i, "shop": {"id": 7 + i % 2}})
    return out


def _files(root: Path, evs: list[dict], per_chunk: int = 10) -> str:
    d = root / "history"
    d.mkdir()
    for k in range(0, len(evs), per_chunk):
        with gzip.open(d / f"part-{k // per_chunk:02d}.jsonl.gz", "wb") as fh:
            fh.write(b"".join(orjson.dumps(e) + b"\n" for e in evs[k:k + per_chunk]))
    return str(d / "*.jsonl.gz")


def _count_aggregate_rows(db) -> int:
    con = open_readonly(str(db))
    try:
        return con.execute("SELECT count(*) FROM aggregates").fetchone()[0]
    finally:
        con.close()


def _latest_equal_recompute(contract, keys) -> None:
    latest = latest_aggregate_rows(contract)
    expected = recompute(specs_of(contract), aggregate_inputs_from_warehouse(contract),
                         {k: v.watermark_us for k, v in latest.items()}, keys)
    assert expected and set(expected) == {k for k in latest if k[:3] in keys}
    for k, m in expected.items():
        assert latest[k].metrics == m, k
        assert latest[k].final


@pytest.fixture()
def warehouse(tmp_path):
    raw = raw_contract({"kind": "duckdb", "path": str(tmp_path / "wh.duckdb")})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    contract = parse_contract(raw)
    write_warehouse(contract, events())
    assert verify(contract).ok  # the stream's own aggregates are exact to begin with
    return tmp_path / "wh.duckdb", contract, str(cfg)


def test_backfill_history_recomputes_the_touched_keys_and_rerun_changes_nothing(warehouse, tmp_path, capsys):
    db, contract, cfg = warehouse
    pattern = _files(tmp_path, _history())
    spec = BackfillSpec(partner="evo", patterns=(pattern,), start_us=FEB, end_us=MAR, backfill_id="hist",
                        wave_chunks=1)  # three waves: each user's history spans waves
    keys = {("evo", "activity", u) for u in HIST_USERS} | {("evo", "per_shop", s) for s in ("7", "8")}
    before = {k: v for k, v in latest_aggregate_rows(contract).items() if k[:3] in keys}
    rows_before = _count_aggregate_rows(db)

    out = io.StringIO()
    assert run_backfill(contract, spec, out=out, err=io.StringIO()) == 0, out.getvalue()
    text = out.getvalue()
    assert "30 records in = 30 rows + 0 dead letters + 0 duplicates + 0 out of range -> OK" in text
    # u1..u3 x (lifetime, 1d) + shops 7, 8 x lifetime; nothing else was touched. February history does not
    # change a 1d window read in March: those 3 rows are already exact and get no new row
    assert touched_keys(contract, "evo", FEB, MAR) == keys
    assert "aggregates: 5 keys recomputed from the warehouse rows, 5 rows written (5 keys changed, " \
           "3 windows already exact)" in text, text
    assert _count_aggregate_rows(db) == rows_before + 5

    _latest_equal_recompute(contract, keys)
    after = latest_aggregate_rows(contract)
    for k, old in before.items():  # strictly above the key's previous versions: the QUALIFY-latest picks it
        if k[3] == "lifetime":
            assert after[k].version > max(v.version for kk, v in before.items() if kk[:3] == k[:3])
        else:
            assert after[k] == old
    assert after[("evo", "activity", "u1", "lifetime")].metrics["n"] == \
        before[("evo", "activity", "u1", "lifetime")].metrics["n"] + 10
    assert after[("evo", "per_shop", "7", "lifetime")].metrics["n"] == 15  # a new key: history only

    code = main(["verify", "--config", cfg])
    verify_out = capsys.readouterr().out
    assert code == 0, verify_out
    assert "verify: OK, 4 aggregates equal the recomputation from the rows" in verify_out

    # rerun of the same id: the ledger says applied, the pass writes nothing
    out = io.StringIO()
    assert run_backfill(contract, spec, out=out, err=io.StringIO()) == 0, out.getvalue()
    assert "already applied" in out.getvalue()
    assert "aggregates: 5 keys recomputed from the warehouse rows, 0 rows written (0 keys changed, " \
           "8 windows already exact)" in out.getvalue(), out.getvalue()
    assert _count_aggregate_rows(db) == rows_before + 5
    assert recompute_aggregates(contract)[0] == []  # and no key anywhere differs


def test_verify_repair_fixes_planted_drift_and_is_idempotent(warehouse, capsys):
    db, contract, cfg = warehouse
    con = duckdb.connect(str(db))
    m = plant_metric_drift(con, "evo", "activity", "u3", "n", 2)
    con.execute("DELETE FROM aggregates WHERE partner='frz' AND aggregate='activity' AND key='u5'")
    plant_unseen_event(con, "evo_events", "u7")
    con.close()
    code = main(["verify", "--config", cfg])
    out = capsys.readouterr().out
    assert code == 1 and "DRIFT in 3 of 4 aggregates" in out, out
    rows_before = _count_aggregate_rows(db)

    code = main(["verify", "--config", cfg, "--repair"])
    out = capsys.readouterr().out
    assert code == 0, out
    # u3 lifetime (differs), frz u5 lifetime + 1d (missing), u7 lifetime and shop 0 lifetime (an early event
    # they never saw: u7's 1d window, read as of its row's watermark, does not include it)
    assert "verify --repair: aggregates: 38 keys recomputed from the warehouse rows, 5 rows written (4 keys " \
           "changed, " in out, out
    assert out.rstrip().endswith("verify: OK, 4 aggregates equal the recomputation from the rows")
    assert _count_aggregate_rows(db) == rows_before + 5
    latest = latest_aggregate_rows(contract)
    assert latest[("evo", "activity", "u3", "lifetime")].metrics["n"] == m["n"] - 2
    _latest_equal_recompute(contract, {("evo", "activity", "u3"), ("frz", "activity", "u5"),
                                       ("evo", "activity", "u7"), ("evo", "per_shop", "0")})

    # again: nothing to repair, nothing written, exit 0
    assert main(["verify", "--config", cfg, "--repair"]) == 0
    assert "verify --repair" not in capsys.readouterr().out
    assert recompute_aggregates(contract)[0] == []
    assert _count_aggregate_rows(db) == rows_before + 5


@pytest.mark.integration
def test_repair_on_the_bigquery_emulator(cloud_services, tmp_path, capsys):
    """The write path on BigQuery (insertAll into the aggregates table) and the QUALIFY-latest read after it."""
    from sinks.bq_client import make_client

    wh = {"kind": "bigquery", "project": "headwater-local", "dataset": unique_id("aggrepair"),
          "endpoint": cloud_services.bigquery,
          "bigquery": {"max_attempts": 2, "initial_backoff_s": 0.05, "request_timeout_s": 60}}
    raw = raw_contract(wh)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    contract = parse_contract(raw)
    write_warehouse(contract, events())
    # an event row streamed in behind the aggregates' back
    client = make_client(contract.warehouse)
    ref = f"{wh['project']}.{wh['dataset']}.evo_events"
    rows = [dict(r) for r in client.query(f"SELECT * FROM `{ref}` WHERE _user_id = 'u2' LIMIT 1").result()]
    row = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in rows[0].items()}
    row.update({"_row_id": "planted", "_event_id": "planted"})
    row = {k: (str(v) if k == "big" and v is not None else v) for k, v in row.items()}
    assert client.insert_rows_json(ref, [row], row_ids=["planted"]) == []
    assert main(["verify", "--config", str(cfg), "--partner", "evo"]) == 1
    capsys.readouterr()

    code = main(["verify", "--config", str(cfg), "--partner", "evo", "--repair"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verify --repair: aggregates: " in out and "rows written (2 keys changed, " in out, out  # u2, a shop
    assert out.rstrip().endswith("verify: OK, 2 aggregates equal the recomputation from the rows")
    _latest_equal_recompute(contract, {("evo", "activity", "u2")})
    assert recompute_aggregates(contract, "evo")[0] == []  # a rerun would write nothing


@pytest.mark.integration
def test_backfill_history_on_the_bigquery_emulator(cloud_services, tmp_path):
    """The same backfill into BigQuery: waves into a staging dataset, MERGE, then the aggregates pass."""
    wh = {"kind": "bigquery", "project": "headwater-local", "dataset": unique_id("aggbf"),
          "endpoint": cloud_services.bigquery,
          "bigquery": {"max_attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 0.5, "request_timeout_s": 60}}
    contract = parse_contract(raw_contract(wh))
    write_warehouse(contract, events())
    pattern = _files(tmp_path, _history())
    spec = BackfillSpec(partner="evo", patterns=(pattern,), start_us=FEB, end_us=MAR, backfill_id="hist",
                        wave_chunks=1)
    keys = {("evo", "activity", u) for u in HIST_USERS} | {("evo", "per_shop", s) for s in ("7", "8")}
    out = io.StringIO()
    assert run_backfill(contract, spec, out=out, err=io.StringIO()) == 0, out.getvalue()
    assert "aggregates: 5 keys recomputed from the warehouse rows, 5 rows written (5 keys changed, " \
           "3 windows already exact)" in out.getvalue(), out.getvalue()
    assert verify(contract).ok
    _latest_equal_recompute(contract, keys)
    out = io.StringIO()
    assert run_backfill(contract, spec, out=out, err=io.StringIO()) == 0, out.getvalue()
    assert "0 rows written (0 keys changed, 8 windows already exact)" in out.getvalue(), out.getvalue()
