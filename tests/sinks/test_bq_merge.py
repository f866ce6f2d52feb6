"""The BigQuery statements a backfill sends (sinks.bq_merge): golden text and structure.

bqemulator runs all of them (tests/backfill/test_backfill_bigquery.py), but it is DuckDB
underneath; these tests pin what production BigQuery receives: the clauses of each MERGE, the
source deduplication, the exact range literals, the transaction wrapper and the job labels.
"""
import re

import pytest

from sinks import bq_merge

T = "p.d.acme_events"
S = "p.d__backfill_x.acme_events"
START, END = 1_772_409_600_000_000, 1_772_582_400_000_000  # 2026-03-02, 2026-03-04


def test_fill_merge_golden():
    sql = bq_merge.fill_merge(T, S, ["_row_id", "_event_time", "amount"])
    assert sql == (
        "MERGE `p.d.acme_events` AS T\n"
        "USING (SELECT `_row_id`, `_event_time`, `amount` FROM `p.d__backfill_x.acme_events` WHERE TRUE "
        "QUALIFY ROW_NUMBER() OVER (PARTITION BY `_row_id`) = 1) AS S\n"
        "ON T.`_row_id` = S.`_row_id`\n"
        "WHEN NOT MATCHED THEN INSERT (`_row_id`, `_event_time`, `amount`) "
        "VALUES (S.`_row_id`, S.`_event_time`, S.`amount`)")
    assert "MATCHED THEN UPDATE" not in sql and "DELETE" not in sql  # fill never changes a live row


def test_columns_merge_sets_only_the_named_columns_and_prunes_by_range():
    sql = bq_merge.columns_merge(T, S, ["loyalty_tier", "segment"], START, END)
    assert sql.splitlines()[2] == (f"ON T.`_row_id` = S.`_row_id` AND T.`_event_time` >= TIMESTAMP_MICROS({START}) "
                                   f"AND T.`_event_time` < TIMESTAMP_MICROS({END})")
    assert sql.splitlines()[3] == "WHEN MATCHED THEN UPDATE SET `loyalty_tier` = S.`loyalty_tier`, `segment` = S.`segment`"
    assert "NOT MATCHED" not in sql  # absent rows are reported, never inserted
    assert "SELECT `_row_id`, `loyalty_tier`, `segment` FROM" in sql
    with pytest.raises(ValueError):
        bq_merge.columns_merge(T, S, [], None, None)
    unbounded = bq_merge.columns_merge(T, S, ["a"], None, None)
    assert "TIMESTAMP_MICROS" not in unbounded


def test_replace_merge_structure():
    sql = bq_merge.replace_merge(T, S, ["_row_id", "_event_time", "amount"], ["_row_id", "_event_time", "amount",
                                                                              "loyalty_tier"], START, END)
    lines = sql.splitlines()
    assert lines[0] == "MERGE `p.d.acme_events` AS T"
    assert lines[3] == ("WHEN MATCHED THEN UPDATE SET `_event_time` = S.`_event_time`, `amount` = S.`amount`, "
                        "`loyalty_tier` = NULL")  # a replaced row is what the backfill produced, not a blend
    assert lines[4].startswith("WHEN NOT MATCHED BY TARGET THEN INSERT (`_row_id`, `_event_time`, `amount`)")
    assert lines[5] == (f"WHEN NOT MATCHED BY SOURCE AND T.`_event_time` >= TIMESTAMP_MICROS({START}) AND "
                        f"T.`_event_time` < TIMESTAMP_MICROS({END}) THEN DELETE")


def test_transaction_wraps_every_table_once():
    stmts = [bq_merge.replace_merge(T, S, ["_row_id"], ["_row_id"], START, END),
             bq_merge.replace_merge(T + "__items", S + "__items", ["_row_id"], ["_row_id"], START, END)]
    sql = bq_merge.transaction(stmts)
    assert sql.startswith("BEGIN TRANSACTION;\nMERGE `p.d.acme_events` AS T")
    assert sql.endswith("THEN DELETE;\nCOMMIT TRANSACTION;")
    assert len(re.findall(r"^MERGE ", sql, flags=re.M)) == 2


def test_absent_rows_and_identifiers_and_labels():
    sql = bq_merge.absent_rows_sql(T, S)
    assert "LEFT JOIN `p.d.acme_events` AS T ON T.`_row_id` = S.`_row_id` WHERE T.`_row_id` IS NULL" in sql
    assert bq_merge.qident("a`b") == "`ab`"  # backquotes cannot break out of an identifier
    assert bq_merge.range_predicate("", None, None) == "TRUE"
    labels = bq_merge.job_labels("fix_days", "replace", "replace")
    assert labels == {"headwater_backfill": "fix_days", "headwater_mode": "replace", "headwater_step": "replace"}
    assert all(re.match(r"^[a-z0-9_-]{1,63}$", v) for v in labels.values())  # BigQuery label value rules
