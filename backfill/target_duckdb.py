"""A backfill's DuckDB side: staging file, ledger, and the atomic apply. No Beam.

Staging is a second DuckDB file next to the warehouse (``<name>.backfill-<id>.duckdb``),
written by the ordinary DuckDB sink (idempotent per event: a wave run twice stages its rows
once). The apply ATTACHes it read-only and, in **one transaction** on the
warehouse file, evolves schemas, changes the partner's tables per mode, copies dead letters
and appends the ledger's ``apply`` row: a crash leaves either all of it or none of it.

* fill: insert the staged rows whose ``_row_id`` the table lacks (rows already there are untouched);
* replace: delete live rows with ``_event_time`` in [from, to), insert the staged rows
  (main and child tables; tables the backfill produced nothing for lose their rows in range);
* columns: ``UPDATE ... SET <named columns> FROM staging WHERE _row_id = ...``; staged rows
  without a live row are counted as absent, never inserted.
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import duckdb

from backfill.ledger import DuckDBLedger, LedgerRow
from backfill.spec import BackfillSpec
from flatten.schema import TableSchema
from sinks.duckdb_store import DuckDBWarehouse, create_table_sql, duck_type, schema_changed
from sinks.spec import WarehouseSpec

__all__ = ["DuckDBTarget"]

_BASE = ("_row_id", "_partition")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _s(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _range(alias: str, spec: BackfillSpec) -> str:
    col = f"{alias}._event_time" if alias else "_event_time"
    parts = []
    if spec.start_us is not None:
        parts.append(f"{col} >= make_timestamp({int(spec.start_us)})")
    if spec.end_us is not None:
        parts.append(f"{col} < make_timestamp({int(spec.end_us)})")
    return " AND ".join(parts) or "TRUE"


class DuckDBTarget:
    kind = "duckdb"

    def __init__(self, warehouse: WarehouseSpec, backfill_id: Optional[str] = None, timeout_s: float = 120.0):
        self.wh = warehouse
        self.path = warehouse.path
        self.bid = backfill_id
        self._timeout = timeout_s
        self.ledger = DuckDBLedger(self.connect)

    # -- connections ------------------------------------------------------------------------------
    def connect(self, path: Optional[str] = None, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self._timeout
        delay = 0.05
        while True:
            try:
                return duckdb.connect(path or self.path, read_only=read_only)
            except duckdb.IOException as exc:  # another process holds the file lock: bounded wait
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- staging ----------------------------------------------------------------------------------
    @property
    def staging_name(self) -> str:
        p = Path(self.path)
        return str(p.with_name(f"{p.stem}.backfill-{self.bid}.duckdb"))

    @property
    def staging_warehouse(self) -> WarehouseSpec:
        return self.wh.model_copy(update={"path": self.staging_name})

    def staging_exists(self) -> bool:
        return os.path.exists(self.staging_name)

    def seed_staging(self, partner: str, table_spec) -> None:
        """Create staging with the live tables' schemas, so the sink reconciles history against the same
        columns and types the stream did (same type decisions, same variant columns)."""
        con = self.connect(self.staging_name)
        try:
            DuckDBWarehouse(self.staging_warehouse, {partner: table_spec}, {})._ensure_meta(con)
            if not os.path.exists(self.path):
                return
            con.execute(f"ATTACH {_s(self.path)} AS hw_backfill_live (READ_ONLY)")
            if not self._has_meta(con, "hw_backfill_live"):
                return
            for t in self._tables(con, "hw_backfill_live", partner):
                schema = self._schema(con, "hw_backfill_live", t)
                con.execute(create_table_sql(t, keyed=t == table_spec.name))
                con.execute("INSERT OR IGNORE INTO _headwater_tables SELECT * FROM hw_backfill_live._headwater_tables "
                            "WHERE table_name = ?", [t])
                if schema is not None:
                    self._evolve(con, t, TableSchema((), schema.version - 1), list(schema.columns))
        finally:
            con.close()

    def drop_staging(self) -> None:
        for f in (self.staging_name, self.staging_name + ".wal"):
            if os.path.exists(f):
                os.unlink(f)

    # -- plan -------------------------------------------------------------------------------------
    def existing(self, spec: BackfillSpec, partner, columns: tuple[str, ...] = ()) -> dict[str, dict]:
        """Live tables of the partner: rows (and partitions) in the backfill's range; which named columns exist."""
        if not os.path.exists(self.path):
            return {}
        con = self.connect(read_only=True)
        try:
            if not con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = '_headwater_tables'").fetchall():
                return {}
            out = {}
            for (t,) in con.execute("SELECT table_name FROM _headwater_tables WHERE partner = ? ORDER BY 1",
                                    [partner.name]).fetchall():
                n, parts = con.execute(f"SELECT count(*), count(DISTINCT _partition) FROM {_q(t)} "
                                       f"WHERE {_range('', spec)}").fetchone()
                have = {r[0] for r in con.execute(f"DESCRIBE {_q(t)}").fetchall()}
                out[t] = {"rows_in_range": n, "partitions_in_range": parts,
                          "columns_present": [c for c in columns if c in have]}
            return out
        finally:
            con.close()

    # -- apply ------------------------------------------------------------------------------------
    def apply(self, spec: BackfillSpec, partner, table_spec) -> dict:
        """Apply staging to the warehouse in one transaction, ledger row included. Returns per-table counts."""
        con = self.connect()
        try:
            has_staging = self.staging_exists()
            if has_staging:
                con.execute(f"ATTACH {_s(self.staging_name)} AS hw_backfill_staging (READ_ONLY)")
            con.execute("BEGIN TRANSACTION")
            try:
                DuckDBWarehouse(self.wh, {partner: table_spec}, {})._ensure_meta(con)  # the store's own DDL
                DuckDBLedger.create(con)
                staged = self._tables(con, "hw_backfill_staging", partner) if has_staging and self._has_meta(con, "hw_backfill_staging") else []
                live = self._tables(con, None, partner)
                tables = sorted(set(staged) | (set(live) if spec.mode == "replace" else set()))
                result: dict = {"tables": {}}
                for t in tables:
                    result["tables"][t] = self._apply_table(con, spec, t, t in staged, t in live,
                                                            keyed=t == table_spec.name)
                result["dead_letters_added"] = self._dead_letters(con) if has_staging else 0
                result["rejected_main_rows"] = self._rejected(con, table_spec.name) if has_staging else 0
                DuckDBLedger.insert(con, [LedgerRow(self.bid or "", "apply", status="applied",
                                                    detail=_json(result), started_at=_now_us(),
                                                    finished_at=_now_us())])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return result
        finally:
            con.close()

    @staticmethod
    def _has_meta(con, db: str) -> bool:
        return DuckDBTarget._has_table(con, db, "_headwater_tables")

    @staticmethod
    def _has_table(con, db: str, table: str) -> bool:
        return bool(con.execute("SELECT 1 FROM information_schema.tables WHERE table_catalog = ? AND table_name = ?",
                                [db, table]).fetchall())

    @staticmethod
    def _tables(con, db: Optional[str], partner: str) -> list[str]:
        prefix = f"{db}." if db else ""
        return [r[0] for r in con.execute(f"SELECT table_name FROM {prefix}_headwater_tables WHERE partner = ? "
                                          "ORDER BY 1", [partner]).fetchall()]

    @staticmethod
    def _schema(con, db: Optional[str], table: str) -> Optional[TableSchema]:
        prefix = f"{db}." if db else ""
        row = con.execute(f"SELECT schema_json FROM {prefix}_headwater_schemas WHERE table_name = ? "
                          "ORDER BY version DESC LIMIT 1", [table]).fetchone()
        return TableSchema.from_json(row[0]) if row else None

    def _evolve(self, con, table: str, live: TableSchema, add: list) -> TableSchema:
        """Add ``add`` (ColumnSchema) to the live table and record the new schema version."""
        add = [c for c in add if c.name not in live and c.name not in _BASE]
        if not add:
            return live
        for c in add:
            con.execute(f"ALTER TABLE {_q(table)} ADD COLUMN IF NOT EXISTS {_q(c.name)} {duck_type(c)}")
        new = TableSchema(tuple(live.columns) + tuple(add), live.version + 1)
        con.execute("INSERT OR IGNORE INTO _headwater_schemas VALUES (?, ?, ?, ?)",
                    [table, new.version, new.to_json(), datetime.now(timezone.utc).replace(tzinfo=None)])
        schema_changed(self.path)  # a held writer of this process caching this file's schemas drops its cache
        return new

    def _create_like_staging(self, con, table: str, keyed: bool) -> TableSchema:
        con.execute(create_table_sql(table, keyed))
        con.execute("INSERT OR IGNORE INTO _headwater_tables SELECT * FROM hw_backfill_staging._headwater_tables WHERE table_name = ?",
                    [table])
        return TableSchema((), 0)

    def _apply_table(self, con, spec: BackfillSpec, table: str, in_staging: bool, in_live: bool,
                     keyed: bool) -> dict:
        t, s = _q(table), f"hw_backfill_staging.{_q(table)}"
        staged = self._schema(con, "hw_backfill_staging", table) if in_staging else None
        live = self._schema(con, None, table) if in_live else None
        n_staged = con.execute(f"SELECT count(*) FROM {s}").fetchone()[0] if in_staging else 0
        out = {"staged": n_staged, "inserted": 0, "updated": 0, "deleted": 0, "absent": 0}
        if spec.mode == "columns":
            if live is None:
                out["absent"] = n_staged
                return out
            # a named column no staged row has a value for is not set (it would only erase live values)
            setc = [c for c in spec.columns if staged is not None and c in staged
                    and con.execute(f"SELECT count({_q(c)}) FROM {s}").fetchone()[0]]
            out["absent"] = con.execute(f"SELECT count(*) FROM {s} AS s ANTI JOIN {t} AS t USING (_row_id)").fetchone()[0]
            if setc:
                self._evolve(con, table, live, [staged.get(c) for c in setc])
                sets = ", ".join(f"{_q(c)} = s.{_q(c)}" for c in setc)
                out["updated"] = con.execute(f"UPDATE {t} SET {sets} FROM {s} AS s WHERE {t}._row_id = s._row_id "
                                             f"AND {_range(t, spec)}").fetchone()[0]
                out["columns_set"] = setc
            return out
        if live is None:
            live = self._create_like_staging(con, table, keyed)
        if spec.mode == "replace":
            matched = con.execute(f"SELECT count(*) FROM {t} WHERE _row_id IN (SELECT _row_id FROM {s})"
                                  ).fetchone()[0] if in_staging else 0
            gone = con.execute(f"DELETE FROM {t} WHERE {_range('', spec)}" + (
                f" OR _row_id IN (SELECT _row_id FROM {s})" if in_staging else "")).fetchone()[0]
            out["deleted"] = gone - matched
            out["updated"] = matched
        if in_staging and staged is not None:
            live = self._evolve(con, table, live, list(staged.columns))
            names = list(_BASE) + [c.name for c in staged.columns if c.name not in _BASE]
            cols = ", ".join(_q(n) for n in names)
            # fill: only staged rows whose _row_id the table lacks (an anti-join: child tables have no key,
            # sinks/duckdb_store.py); replace deleted the staged ids above, so a plain INSERT
            absent = (f" WHERE NOT EXISTS (SELECT 1 FROM {t} AS l WHERE l._row_id = st._row_id)"
                      if spec.mode == "fill" else "")
            n = con.execute(f"INSERT INTO {t} ({cols}) SELECT {cols} FROM {s} AS st{absent} "
                            "ORDER BY _partition").fetchone()[0]
            out["inserted"] = n - out["updated"]
        return out

    def _rejected(self, con, main: str) -> int:
        """Main rows the sink rejected while staging (dead letters with source 'warehouse')."""
        if not self._has_table(con, "hw_backfill_staging", self.wh.dead_letter_table):
            return 0
        return con.execute(f"SELECT count(DISTINCT coords) FROM hw_backfill_staging.{_q(self.wh.dead_letter_table)} "
                           "WHERE source = 'warehouse' AND starts_with(coords, ?)", [f"table:{main}/"]).fetchone()[0]

    def _dead_letters(self, con) -> int:
        dl = _q(self.wh.dead_letter_table)
        if not self._has_table(con, "hw_backfill_staging", self.wh.dead_letter_table):
            return 0
        cols = ", ".join(_q(r[0]) for r in con.execute(f"DESCRIBE hw_backfill_staging.{dl}").fetchall())
        return con.execute(f"INSERT OR IGNORE INTO {dl} ({cols}) SELECT {cols} FROM hw_backfill_staging.{dl}").fetchone()[0]


def _now_us() -> int:
    return int(time.time() * 1_000_000)


def _json(obj) -> str:
    import orjson

    return orjson.dumps(obj).decode()
