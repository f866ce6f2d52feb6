"""Aggregates from history: after a backfill, and ``headwater verify --repair``. No Beam.

A backfill writes rows in waves; a key's events span waves (and the stream's older rows), so the
waves compute no aggregates. This pass does, once, from the warehouse itself:

    keys     = (partner, aggregate, key) of the warehouse rows with an event time in [from, to)
               (the backfill's range; every key when the range is open and ``keys`` is not given)
    expected = state.recompute over ALL of those keys' rows (the stream's own pure functions)
    for each (key, window) whose latest row (QUALIFY-latest by version) differs from expected,
    or is missing: write ONE final row, version = max(key's max version + 1, watermark)

The row's ``watermark`` is the later of the key's state clock (latest event time + 1 us) and the
watermark of the latest row it supersedes, and sliding windows are read as of it, so
``headwater verify`` (which recomputes each window as of its latest row's watermark) finds it exact.
The version follows the stream's rule (``version = max(previous + 1, W)``, state/aggregate.py). A
stream still running for the key does not hold the backfilled history in its state: its next
emission supersedes this row and verify reports the key again (docs/backfill.md, "Aggregates").

Idempotent: a (key, window) whose latest row already equals the recomputation gets no row, so a
rerun writes nothing. Keys verify reports as *extra* (aggregate rows without any event row) are
not touched: there is nothing to recompute them from (docs/backfill.md, "Aggregates").
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

import orjson

from flatten.records import AggregateRow
from sinks.warehouse_reader import aggregate_inputs_from_warehouse, latest_aggregate_rows, specs_of
from state import aggregate as A
from state.recompute import AggKey, fold_states, values_at

__all__ = ["AggregatesResult", "recompute_aggregates", "write_aggregate_rows"]


@dataclass
class AggregatesResult:
    keys_recomputed: int = 0  # (partner, aggregate, key) recomputed from their rows
    windows_checked: int = 0
    rows_written: int = 0  # (key, window) rows written (those that differed or were missing)
    keys_changed: int = 0  # keys with at least one row written

    def line(self) -> str:
        return (f"aggregates: {self.keys_recomputed:,} keys recomputed from the warehouse rows, "
                f"{self.rows_written:,} rows written ({self.keys_changed:,} keys changed, "
                f"{self.windows_checked - self.rows_written:,} windows already exact)")


def _same(exp: dict, found: dict) -> bool:
    """Exact equality as ``headwater verify`` compares (a bool is not an int)."""
    if set(exp) != set(found):
        return False
    return all(exp[n] == found[n] and (type(exp[n]) is bool) == (type(found[n]) is bool) for n in exp)


def touched_keys(contract, partner: Optional[str], start_us: Optional[int], end_us: Optional[int]) -> set[AggKey]:
    """(partner, aggregate, key) of the warehouse rows with an event time in [start, end)."""
    return {(i.partner, i.aggregate, i.key) for i in aggregate_inputs_from_warehouse(contract, partner, start_us)
            if end_us is None or i.event_time_us < end_us}


def recompute_aggregates(contract, partner: Optional[str] = None, keys: Optional[set[AggKey]] = None,
                         now_us: Optional[int] = None) -> tuple[list[AggregateRow], AggregatesResult]:
    """The rows that make the latest aggregate rows of ``keys`` (every key when None) equal the
    recomputation from the warehouse rows; nothing for a (key, window) already equal."""
    specs = specs_of(contract, partner)
    plans = {k: A.plan_for(s) for k, s in specs.items()}
    latest = latest_aggregate_rows(contract, partner)
    states = fold_states(specs, aggregate_inputs_from_warehouse(contract, partner), keys)
    max_version: dict[AggKey, int] = {}
    for (p, a, k, _w), row in latest.items():
        max_version[(p, a, k)] = max(max_version.get((p, a, k), 0), row.version)
    now = int(time.time() * 1_000_000) if now_us is None else now_us
    res = AggregatesResult(keys_recomputed=len(states))
    out: list[AggregateRow] = []
    for (p, a, k), st in sorted(states.items()):
        plan = plans[(p, a)]
        pending = []
        for window, _length in plan.windows:
            res.windows_checked += 1
            row = latest.get((p, a, k, window))
            wm = st.clock_us if row is None else max(row.watermark_us, st.clock_us)
            exp = values_at(st, plan, window, wm)
            if row is not None and row.watermark_us == wm and _same(exp, row.metrics):
                continue
            pending.append((window, exp, wm))
        if not pending:
            continue
        res.keys_changed += 1
        base = max_version.get((p, a, k), 0) + 1
        for window, exp, wm in pending:
            out.append(AggregateRow(partner=p, aggregate=a, key=k, window=window, metrics=orjson.dumps(exp),
                                    watermark_us=wm, version=max(base, wm), emitted_us=now, final=True))
    res.rows_written = len(out)
    return out, res


def write_aggregate_rows(contract, rows: Iterable[AggregateRow]) -> int:
    """Append ``rows`` to the aggregates table (DuckDB file or BigQuery). Returns the rows written."""
    rows = list(rows)
    if not rows:
        return 0
    wh = contract.warehouse
    if wh.kind == "duckdb":
        from sinks.duckdb_store import DuckDBWarehouse

        return DuckDBWarehouse(wh, {}, {}).write_aggregates(rows)
    from sinks import bq_rows
    from sinks.bq_client import BigQueryTables

    bq = BigQueryTables(wh)
    layout = bq_rows.aggregates_layout(wh)
    schema = bq.provide(layout, layout.base)
    rejections = bq.write(layout, schema, [bq_rows.aggregate_record(r) for r in rows], "streaming_inserts")
    if rejections:
        raise RuntimeError(f"BigQuery rejected {len(rejections)} aggregate rows: {rejections[0].message}")
    return len(rows)


def run_aggregates_pass(contract, partner: Optional[str], keys: Optional[set[AggKey]]) -> AggregatesResult:
    """Recompute ``keys`` and write the rows that differ."""
    rows, res = recompute_aggregates(contract, partner, keys)
    write_aggregate_rows(contract, rows)
    return res
