"""A backfill's BigQuery side: staging dataset, ledger, and the MERGE apply. No Beam.

Staging is a dataset beside the warehouse's (``<dataset>__backfill_<id>``) written by the
ordinary bounded BigQuery sink (load jobs, tables created with the same partitioning and
clustering). The apply then, per partner table (main and children):

1. evolves the live schema first (``BigQueryTables.provide``: ``ALTER TABLE ADD COLUMN IF NOT
   EXISTS``; a missing live table is created from the staged schema) -- DDL cannot run inside
   a transaction, so it runs before;
2. counts what the statement will do (staged, absent, in-range rows not reproduced);
3. runs the mode's statement from ``sinks.bq_merge``: one MERGE per table for ``fill`` and
   ``columns`` (each atomic and idempotent), all tables' MERGEs in one multi-statement
   transaction for ``replace``; dead letters with a ``fill`` MERGE on ``_row_id``;
4. appends the ledger's ``apply`` row. A crash between 3 and 4 is harmless: the rerun's
   MERGEs change nothing and the row is written then.
"""
from __future__ import annotations

import time
from typing import Optional

from backfill.ledger import BigQueryLedger, LedgerRow
from backfill.spec import BackfillSpec
from flatten.schema import TableSchema
from sinks import bq_merge
from sinks.bq_rows import dead_letters_layout, from_bigquery_fields, layout_for_row_table
from sinks.spec import WarehouseSpec

__all__ = ["BigQueryTarget"]


class BigQueryTarget:
    kind = "bigquery"

    def __init__(self, warehouse: WarehouseSpec, backfill_id: Optional[str] = None):
        from sinks.bq_client import make_client

        self.wh = warehouse
        self.bid = backfill_id
        self.client = make_client(warehouse)
        self._timeout = warehouse.bigquery.request_timeout_s
        self.ledger = BigQueryLedger(self.client, warehouse.project, warehouse.dataset, self._timeout)
        self.statements: list[str] = []  # every apply statement sent, in order (for the summary and tests)

    # -- staging ----------------------------------------------------------------------------------
    @property
    def staging_name(self) -> str:
        return f"{self.wh.dataset}__backfill_{self.bid}"

    @property
    def staging_warehouse(self) -> WarehouseSpec:
        return self.wh.model_copy(update={"dataset": self.staging_name})

    def ensure(self) -> None:
        from sinks.bq_client import BigQueryTables

        BigQueryTables(self.wh, client=self.client).ensure_dataset()
        self.ledger.ensure()

    def staging_exists(self) -> bool:
        from google.api_core import exceptions as gexc

        try:
            self.client.get_dataset(f"{self.wh.project}.{self.staging_name}", retry=None, timeout=self._timeout)
            return True
        except gexc.NotFound:
            return False

    def drop_staging(self) -> None:
        self.client.delete_dataset(f"{self.wh.project}.{self.staging_name}", delete_contents=True, not_found_ok=True,
                                   retry=None, timeout=self._timeout)

    # -- helpers ----------------------------------------------------------------------------------
    def _ref(self, dataset: str, table: str) -> str:
        return f"{self.wh.project}.{dataset}.{table}"

    def _query(self, sql: str, step: str, mode: str = "") -> list[dict]:
        from google.cloud import bigquery

        cfg = bigquery.QueryJobConfig(labels=bq_merge.job_labels(self.bid or "plan", mode or "plan", step))
        job = self.client.query(sql, job_config=cfg, retry=None, job_retry=None, timeout=self._timeout)
        return [dict(r) for r in job.result(timeout=self._timeout, retry=None)]

    def _partner_tables(self, dataset: str, main: str) -> list[str]:
        from google.api_core import exceptions as gexc

        try:
            return sorted(t.table_id for t in self.client.list_tables(f"{self.wh.project}.{dataset}", retry=None,
                                                                      timeout=self._timeout)
                          if t.table_id == main or t.table_id.startswith(main + "__"))
        except gexc.NotFound:
            return []

    def _schema(self, dataset: str, table: str) -> TableSchema:
        t = self.client.get_table(self._ref(dataset, table), retry=None, timeout=self._timeout)
        return from_bigquery_fields(f.to_api_repr() for f in t.schema)

    # -- plan -------------------------------------------------------------------------------------
    def existing(self, spec: BackfillSpec, partner, columns: tuple[str, ...] = ()) -> dict[str, dict]:
        out = {}
        for t in self._partner_tables(self.wh.dataset, partner.table.name):
            ref = bq_merge.qident(self._ref(self.wh.dataset, t))
            rng = bq_merge.range_predicate("", spec.start_us, spec.end_us)
            gran = partner.table.partition_granularity
            r = self._query(f"SELECT COUNT(*) AS n, COUNT(DISTINCT TIMESTAMP_TRUNC(_event_time, {gran})) AS p "
                            f"FROM {ref} WHERE {rng}", "plan")[0]
            have = set(self._schema(self.wh.dataset, t).names())
            out[t] = {"rows_in_range": r["n"], "partitions_in_range": r["p"],
                      "columns_present": [c for c in columns if c in have]}
        return out

    # -- apply ------------------------------------------------------------------------------------
    def apply(self, spec: BackfillSpec, partner: str, table_spec) -> dict:
        from sinks.bq_client import BigQueryTables

        live_tables = BigQueryTables(self.wh, client=self.client)
        staged = self._partner_tables(self.staging_name, table_spec.name)
        live = self._partner_tables(self.wh.dataset, table_spec.name)
        tables = sorted(set(staged) | (set(live) if spec.mode == "replace" else set()))
        result: dict = {"tables": {}}
        statements: list[str] = []
        for t in tables:
            counts, stmt = self._plan_table(spec, partner, table_spec, live_tables, t, t in staged, t in live)
            result["tables"][t] = counts
            if stmt:
                statements.append(stmt)
        dl_stmt = self._dead_letter_statement(live_tables)
        result["rejected_main_rows"] = self._rejected(table_spec.name) if dl_stmt else 0
        if spec.mode == "replace" and statements:
            self._run(bq_merge.transaction(statements), "replace", spec.mode)
        else:
            for s in statements:
                self._run(s, "merge", spec.mode)
        if dl_stmt:
            self._run(dl_stmt, "dead_letters", spec.mode)
        self.ledger.append([LedgerRow(self.bid or "", "apply", status="applied", detail=_json(result),
                                      started_at=_now_us(), finished_at=_now_us())])
        return result

    def _run(self, sql: str, step: str, mode: str) -> None:
        self.statements.append(sql)
        self._query(sql, step, mode)

    def _count(self, sql: str) -> int:
        return int(self._query(sql, "count")[0]["n"])

    def _plan_table(self, spec, partner, table_spec, live_tables, table, in_staging, in_live):
        layout = layout_for_row_table(table, partner, table_spec)
        stg_ref = self._ref(self.staging_name, table)
        tgt_ref = self._ref(self.wh.dataset, table)
        staged = self._schema(self.staging_name, table) if in_staging else None
        n_staged = self._count(f"SELECT COUNT(DISTINCT _row_id) AS n FROM {bq_merge.qident(stg_ref)}") if staged else 0
        out = {"staged": n_staged, "inserted": 0, "updated": 0, "deleted": 0, "absent": 0}
        if spec.mode == "columns":
            if not in_live:
                out["absent"] = n_staged
                return out, None
            setc = [c for c in spec.columns if staged is not None and c in staged]
            out["absent"] = self._count(bq_merge.absent_rows_sql(tgt_ref, stg_ref))
            if not setc:
                return out, None
            live = live_tables.schema_of(layout)
            wanted = TableSchema(tuple(live.columns) + tuple(staged.get(c) for c in setc if c not in live),
                                 live.version + 1)
            live_tables.provide(layout, wanted)  # schema evolves first
            out["updated"] = n_staged - out["absent"]
            out["columns_set"] = setc
            return out, bq_merge.columns_merge(tgt_ref, stg_ref, setc, spec.start_us, spec.end_us)
        if staged is None:  # replace: a live child table the backfill produced nothing for
            rng = bq_merge.range_predicate("", spec.start_us, spec.end_us)
            out["deleted"] = self._count(f"SELECT COUNT(*) AS n FROM {bq_merge.qident(tgt_ref)} WHERE {rng}")
            return out, f"DELETE FROM {bq_merge.qident(tgt_ref)} WHERE {rng}"
        live = live_tables.provide(layout, staged)  # creates the live table if missing, adds columns first
        absent = self._count(bq_merge.absent_rows_sql(tgt_ref, stg_ref)) if in_live else n_staged
        out["inserted"] = absent
        if spec.mode == "fill":
            return out, bq_merge.fill_merge(tgt_ref, stg_ref, staged.names())
        out["updated"] = n_staged - absent
        if in_live:
            rng = bq_merge.range_predicate("T", spec.start_us, spec.end_us)
            out["deleted"] = self._count(
                f"SELECT COUNT(*) AS n FROM {bq_merge.qident(tgt_ref)} AS T WHERE {rng} AND T._row_id NOT IN "
                f"(SELECT _row_id FROM {bq_merge.qident(stg_ref)})")
        return out, bq_merge.replace_merge(tgt_ref, stg_ref, staged.names(), live.names(), spec.start_us, spec.end_us)

    def _rejected(self, main: str) -> int:
        """Main rows the sink rejected while staging (dead letters with source 'warehouse')."""
        ref = bq_merge.qident(self._ref(self.staging_name, self.wh.dead_letter_table))
        return self._count(f"SELECT COUNT(DISTINCT coords) AS n FROM {ref} WHERE source = 'warehouse' "
                           f"AND STARTS_WITH(coords, 'bigquery:{main}/')")

    def _dead_letter_statement(self, live_tables) -> Optional[str]:
        name = self.wh.dead_letter_table
        if name not in self._all_tables(self.staging_name):
            return None
        layout = dead_letters_layout(self.wh)
        live_tables.provide(layout, layout.base)
        cols = self._schema(self.staging_name, name).names()
        return bq_merge.fill_merge(self._ref(self.wh.dataset, name), self._ref(self.staging_name, name), cols)

    def _all_tables(self, dataset: str) -> set[str]:
        from google.api_core import exceptions as gexc

        try:
            return {t.table_id for t in self.client.list_tables(f"{self.wh.project}.{dataset}", retry=None,
                                                                timeout=self._timeout)}
        except gexc.NotFound:
            return set()


def _now_us() -> int:
    return int(time.time() * 1_000_000)


def _json(obj) -> str:
    import orjson

    return orjson.dumps(obj).decode()
