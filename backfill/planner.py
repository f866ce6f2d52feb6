"""``headwater backfill plan``: what a backfill would read and do, writing nothing. No Beam.

One pass over the listing (lazy, page by page): the first N chunks are kept for display, a
reservoir sample of a few is read fully to estimate events per byte and the event-time
span, and everything else is only counted. The live warehouse is read (never written) to
say what the mode will do to the rows already there.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Optional, TextIO

from backfill.chunks import iter_chunks, reservoir, sample_chunks
from backfill.spec import GRANULARITY_US, BackfillSpec, format_us
from ingest.contract import Contract, ContractError

__all__ = ["make_target", "build_plan", "render_plan", "partitions", "mode_effect"]


def make_target(contract: Contract, backfill_id: Optional[str]):
    if contract.warehouse.kind == "bigquery":
        from backfill.target_bigquery import BigQueryTarget

        return BigQueryTarget(contract.warehouse, backfill_id)
    from backfill.target_duckdb import DuckDBTarget

    return DuckDBTarget(contract.warehouse, backfill_id)


def partitions(start_us: int, end_us: int, granularity: str, limit: int = 1_000_000) -> tuple[int, str, str]:
    """(count, first, last) of the partitions of ``granularity`` that [start, end) touches."""
    if end_us <= start_us:
        return 0, "-", "-"
    if granularity in GRANULARITY_US:
        g = GRANULARITY_US[granularity]
        first, last = start_us - start_us % g, (end_us - 1) - (end_us - 1) % g
        return (last - first) // g + 1, format_us(first), format_us(last)
    a = datetime.fromtimestamp(start_us / 1e6, tz=timezone.utc)
    b = datetime.fromtimestamp((end_us - 1) / 1e6, tz=timezone.utc)
    if granularity == "YEAR":
        return b.year - a.year + 1, f"{a.year}", f"{b.year}"
    return (b.year - a.year) * 12 + b.month - a.month + 1, f"{a.year}-{a.month:02d}", f"{b.year}-{b.month:02d}"


def mode_effect(spec: BackfillSpec, table: str, existing: dict) -> str:
    """In words: what the mode does to rows already in the warehouse."""
    in_range = sum(t["rows_in_range"] for t in existing.values())
    main = existing.get(table, {}).get("rows_in_range", 0)
    rng = spec.describe_range()
    if spec.mode == "fill":
        return (f"fill: inserts only rows whose _row_id is absent from {table} and its child tables. The {main:,} "
                f"rows already in {table} for {rng} ({in_range:,} with child tables) are left exactly as they are: "
                "a row the stream wrote is never duplicated or changed. Dead letters of the history are added.")
    if spec.mode == "replace":
        return (f"replace: every partition of {rng} in {table} and its child tables becomes exactly what this "
                f"backfill produces, in one transaction: the {in_range:,} rows there now are overwritten (same "
                "_row_id) or deleted (not reproduced by the history). Partitions outside the range are untouched.")
    cols = ", ".join(spec.columns)
    present = sorted({c for t in existing.values() for c in t.get("columns_present", [])})
    return (f"columns: sets only [{cols}] on rows already in {table} (and child tables that have those columns), "
            f"matched by _row_id; {main:,} rows of {table} are in {rng}. No row is inserted or deleted; rows found "
            "in the history but absent from the warehouse are counted and reported. "
            + (f"Already present: {present}." if present else "The columns are added to the schema first."))


def build_plan(contract: Contract, spec: BackfillSpec, first: int = 10, sample: int = 3) -> dict:
    from apache_beam.io.filesystem import FileSystem  # noqa: F401  (glob syntax; imported before the clock starts)

    partner = contract.partner(spec.partner)
    try:
        spec.check_partitions(partner.table.name, partner.table.partition_granularity)
    except ValueError as exc:
        raise ContractError(str(exc)) from None
    t0 = time.monotonic()
    head, picked, count, total = reservoir(iter_chunks(spec.patterns), k=sample, keep_first=first)
    listed_s = time.monotonic() - t0
    s = sample_chunks(picked, partner.envelope, spec.format, spec.in_range)
    est = int(total * s.records_per_byte)
    est_in = int(est * s.in_range / s.records) if s.records else 0
    gran = partner.table.partition_granularity
    lo = spec.start_us if spec.start_us is not None else s.min_event_us
    hi = spec.end_us if spec.end_us is not None else (s.max_event_us + 1 if s.max_event_us is not None else None)
    nparts, pfirst, plast = partitions(lo, hi, gran) if lo is not None and hi is not None else (0, "-", "-")
    target = make_target(contract, spec.backfill_id)
    existing = target.existing(spec, partner, spec.columns)
    return {
        "partner": partner.name, "table": partner.table.name, "warehouse": contract.warehouse.kind,
        "mode": spec.mode, "columns": list(spec.columns), "range": spec.describe_range(),
        "chunks": {"count": count, "bytes": total, "first": [c._asdict() for c in head], "listed_s": round(listed_s, 3)},
        "sample": {"chunks": s.chunks, "bytes": s.bytes, "records": s.records, "in_range": s.in_range,
                   "without_event_time": s.no_time, "min_event_time": format_us(s.min_event_us),
                   "max_event_time": format_us(s.max_event_us)},
        "estimate": {"events": est, "events_in_range": est_in},
        "partitions": {"granularity": gran, "count": nparts, "first": pfirst, "last": plast,
                       "from_sample": spec.start_us is None or spec.end_us is None},
        "existing": existing,
        "effect": mode_effect(spec, partner.table.name, existing),
        "writes": "nothing (plan)",
        "plan_s": round(time.monotonic() - t0, 3),
    }


def render_plan(plan: dict, out: TextIO) -> None:
    c = plan["chunks"]
    w = out.write
    w(f"backfill plan: partner {plan['partner']} -> {plan['warehouse']} table {plan['table']}, mode {plan['mode']}"
      f"{' ' + str(plan['columns']) if plan['columns'] else ''}, events {plan['range']}\n")
    w(f"\nChunks: {c['count']:,} objects, {c['bytes']:,} bytes (listed in {c['listed_s']:.2f}s, one pass)\n")
    for ch in c["first"]:
        w(f"  {ch['uri']}  {ch['size']:,} B  gen {ch['generation']}\n")
    if c["count"] > len(c["first"]):
        w(f"  ... and {c['count'] - len(c['first']):,} more\n")
    s, e = plan["sample"], plan["estimate"]
    no_time = f", {s['without_event_time']:,} without a readable event time" if s["without_event_time"] else ""
    w(f"\nEvents (estimated from {s['chunks']} sampled chunks, {s['records']:,} records): ~{e['events']:,} in all, "
      f"~{e['events_in_range']:,} in range; sampled event times {s['min_event_time']} .. {s['max_event_time']}"
      f"{no_time}\n")
    p = plan["partitions"]
    w(f"Partitions touched ({p['granularity']}{', estimated from the sample' if p['from_sample'] else ''}): "
      f"{p['count']:,} ({p['first']} .. {p['last']})\n")
    w("\nRows already in the warehouse for this range:\n")
    if not plan["existing"]:
        w("  none (tables do not exist yet)\n")
    for t, x in plan["existing"].items():
        w(f"  {t:<40} {x['rows_in_range']:>10,} rows in {x['partitions_in_range']:,} partitions\n")
    w(f"\nEffect on rows already there: {plan['effect']}\n")
    w(f"\nWrites: {plan['writes']}. Plan took {plan['plan_s']:.2f}s.\n")
