"""BigQuery statements that apply a staged backfill to the live tables. Pure: text in, text out.

A backfill writes its rows with the ordinary bounded sink into a *staging* dataset
(load jobs), then one statement per table moves them into the live table:

* ``fill``: ``MERGE ... WHEN NOT MATCHED THEN INSERT`` on ``_row_id``: rows already
  there (the stream wrote them) are untouched, missing ones are inserted, none twice.
* ``columns``: ``MERGE ... WHEN MATCHED THEN UPDATE SET <named columns>``; staged rows
  with no live row are counted by :func:`absent_rows_sql`, never inserted.
* ``replace``: ``MERGE`` with ``WHEN MATCHED THEN UPDATE`` (every live column: staged value
  or NULL), ``WHEN NOT MATCHED BY TARGET THEN INSERT`` and ``WHEN NOT MATCHED BY SOURCE AND
  <_event_time in range> THEN DELETE``; every table's MERGE in one multi-statement
  transaction (:func:`transaction`), so main and child tables change together or not at all.

The staged side is always deduplicated on ``_row_id`` (``QUALIFY ROW_NUMBER() ... = 1``):
a wave re-run after a crash may have appended the same rows to staging twice (bqemulator
accepts a repeated load job id; BigQuery answers 409), and MERGE fails when two source rows
match one target row. Every statement is idempotent: running it again changes nothing.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["qident", "staged_source", "fill_merge", "columns_merge", "replace_merge", "absent_rows_sql",
           "range_predicate", "transaction", "job_labels"]

ROW_ID = "_row_id"
EVENT_TIME = "_event_time"


def qident(name: str) -> str:
    """A backquoted BigQuery identifier (table refs ``project.dataset.table`` included)."""
    return "`" + name.replace("`", "") + "`"


def range_predicate(alias: str, start_us: Optional[int], end_us: Optional[int], column: str = EVENT_TIME) -> str:
    """``alias.column`` in [start, end) with exact microsecond literals; ``TRUE`` when unbounded."""
    parts = []
    col = f"{alias}.{qident(column)}" if alias else qident(column)
    if start_us is not None:
        parts.append(f"{col} >= TIMESTAMP_MICROS({int(start_us)})")
    if end_us is not None:
        parts.append(f"{col} < TIMESTAMP_MICROS({int(end_us)})")
    return " AND ".join(parts) or "TRUE"


def staged_source(staging_ref: str, columns: Sequence[str]) -> str:
    """The staged rows, one per ``_row_id``."""
    cols = ", ".join(qident(c) for c in columns)
    return (f"(SELECT {cols} FROM {qident(staging_ref)} WHERE TRUE "
            f"QUALIFY ROW_NUMBER() OVER (PARTITION BY {qident(ROW_ID)}) = 1)")


def _insert(columns: Sequence[str]) -> str:
    return (f"INSERT ({', '.join(qident(c) for c in columns)}) "
            f"VALUES ({', '.join('S.' + qident(c) for c in columns)})")


def fill_merge(target_ref: str, staging_ref: str, columns: Sequence[str]) -> str:
    """Insert staged rows whose ``_row_id`` the live table lacks. No range on the target: a live row
    with the same id is never duplicated, wherever it is partitioned."""
    return (f"MERGE {qident(target_ref)} AS T\n"
            f"USING {staged_source(staging_ref, columns)} AS S\n"
            f"ON T.{qident(ROW_ID)} = S.{qident(ROW_ID)}\n"
            f"WHEN NOT MATCHED THEN {_insert(columns)}")


def columns_merge(target_ref: str, staging_ref: str, set_columns: Sequence[str],
                  start_us: Optional[int], end_us: Optional[int]) -> str:
    """Set ``set_columns`` on live rows matched by ``_row_id`` (the range prunes the live table's partitions)."""
    if not set_columns:
        raise ValueError("columns_merge needs at least one column to set")
    src = [ROW_ID, *[c for c in set_columns if c != ROW_ID]]
    sets = ", ".join(f"{qident(c)} = S.{qident(c)}" for c in set_columns)
    on = f"T.{qident(ROW_ID)} = S.{qident(ROW_ID)}"
    rng = range_predicate("T", start_us, end_us)
    if rng != "TRUE":
        on += f" AND {rng}"
    return (f"MERGE {qident(target_ref)} AS T\n"
            f"USING {staged_source(staging_ref, src)} AS S\n"
            f"ON {on}\n"
            f"WHEN MATCHED THEN UPDATE SET {sets}")


def replace_merge(target_ref: str, staging_ref: str, staged_columns: Sequence[str], live_columns: Sequence[str],
                  start_us: int, end_us: int) -> str:
    """Make the live rows with ``_event_time`` in [start, end) exactly the staged rows.

    Live columns the backfill did not produce are set to NULL on replaced rows (the row is
    what the backfill produced, not a blend). Live rows outside the range are never touched.
    """
    staged = list(staged_columns)
    sets = [f"{qident(c)} = S.{qident(c)}" for c in staged if c != ROW_ID]
    sets += [f"{qident(c)} = NULL" for c in live_columns if c not in staged and c != ROW_ID]
    return (f"MERGE {qident(target_ref)} AS T\n"
            f"USING {staged_source(staging_ref, staged)} AS S\n"
            f"ON T.{qident(ROW_ID)} = S.{qident(ROW_ID)}\n"
            f"WHEN MATCHED THEN UPDATE SET {', '.join(sets)}\n"
            f"WHEN NOT MATCHED BY TARGET THEN {_insert(staged)}\n"
            f"WHEN NOT MATCHED BY SOURCE AND {range_predicate('T', start_us, end_us)} THEN DELETE")


def absent_rows_sql(target_ref: str, staging_ref: str) -> str:
    """How many staged rows have no live row (``columns`` reports them instead of inventing rows)."""
    return (f"SELECT COUNT(*) AS n FROM {staged_source(staging_ref, [ROW_ID])} AS S "
            f"LEFT JOIN {qident(target_ref)} AS T ON T.{qident(ROW_ID)} = S.{qident(ROW_ID)} "
            f"WHERE T.{qident(ROW_ID)} IS NULL")


def transaction(statements: Sequence[str]) -> str:
    """One multi-statement transaction: all statements commit together or none does."""
    body = ";\n".join(s.rstrip().rstrip(";") for s in statements)
    return f"BEGIN TRANSACTION;\n{body};\nCOMMIT TRANSACTION;"


def job_labels(backfill_id: str, mode: str, step: str) -> dict:
    """Labels on every apply job (visible in INFORMATION_SCHEMA.JOBS and billing exports)."""
    return {"headwater_backfill": backfill_id[:63], "headwater_mode": mode, "headwater_step": step}
