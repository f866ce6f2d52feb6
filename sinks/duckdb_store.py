"""The embedded warehouse: one DuckDB file. Pure (no Beam): used by the sink DoFns and the CLI.

Tables
- one per partner table and per child table (``<table>__<array path>``). Writes are idempotent per
  **event**: the main table has ``_row_id`` (the event's key) as PRIMARY KEY; a child table holds
  ``_row_id`` as a plain column, and its rows are inserted in the same transaction as their event's main
  row, only when that main row was not stored yet. So re-running the same input never duplicates rows,
  and DuckDB keeps one key per event in memory, not one per row: its key index (ART) is not evicted to
  disk, ~71 bytes per key (``bench/duckdb_index_probe.py``), which at 2.5 rows per event was most of a
  10M-event run's memory (bench/README.md, "Third pass"). What that needs, and how it is kept:

  * an event's rows are written in one write (the sinks get them together: the bounded job's batches
    hold whole events; the streaming sink flushes only before a main row, and its input is fused with
    the step that makes an event's rows one after the other: every runner that runs this sink, the
    FnApiRunner and Prism, fuses that chain). A write's statements run in one transaction, so a kill
    leaves an event's rows all stored or none. (Were an event split over two writes, its later rows
    would go in by the rule for rows without their main row, below; but a kill between the two writes,
    then a rerun delivering the event whole, would skip the rows of the second.);
  * a write first tries plain INSERTs (cheapest); a stored main row id fails it, and it runs again
    careful: main rows ``INSERT OR IGNORE ... RETURNING`` the stored ids, child rows only for those;
  * child rows whose main row is not in the write (the warehouse refused the main row; ``freeze``
    refused it) go in only where their ``_row_id`` is absent (an anti-join: rare, costs a scan);
  * warehouses written before this keep their child tables' PRIMARY KEY; writes into them use
    ``INSERT OR IGNORE`` where a key could meet a stored one.
- ``_partition`` (TIMESTAMP): the partition column truncated to the table's
  granularity. DuckDB has no declarative partitions; a write of at least a row group
  (``ROW_GROUP_ROWS``) is inserted in ``_partition`` order so DuckDB's per-row-group
  min/max zone maps skip unrelated row groups on ``WHERE _partition = ...`` filters
  (smaller writes are not sorted: a row group holding several of them spans their whole
  range whether each is sorted or not; time-ordered input fills row groups in order by
  itself). Clustering columns
  are recorded in ``_headwater_tables`` (BigQuery applies them; DuckDB does not);
- ``dead_letters``, ``aggregates``; ``_headwater_schemas`` keeps every version of
  every table schema (``headwater schema`` reads it).

Several writers in one process share a lock; writers in other processes retry
while DuckDB's file lock is held.

Held connections (the streaming sink, ``keep_open=True``): connect, the schema queries and the checkpoint
on close cost ~60-100 ms of CPU per write whatever its size, and a live job writes small bundles. Such
writers share one write connection per file and process that stays open between writes. Every statement
still commits on its own (DuckDB's write-ahead log, so a write that returned survives a kill -9), the
schemas are known in-process while the file is held (no other process can change it then), and the
connection is closed, which checkpoints and lets other processes in (``headwater verify``, tests,
``open_readonly``), after ``HOLD_IDLE_S`` without a write or ``HOLD_MAX_S`` after it was opened; after a
release for age the next write waits ``READER_GAP_S`` so a waiting reader's retry gets in.
"""
from __future__ import annotations

import atexit
import base64
import hashlib
import os
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Iterable, Mapping, Optional, Sequence

import duckdb
import orjson

from flatten.options import SchemaMode
from flatten.records import AggregateRow, DeadLetter, Reason, TableRow
from flatten.schema import ColumnSchema, TableSchema, reconcile
from sinks.spec import TableSpec, WarehouseSpec

__all__ = ["DuckDBWarehouse", "PreparedRows", "create_table_sql", "duck_type", "open_readonly", "prepare_rows",
           "release_held"]

#: DuckDB worker threads of a write connection. Writes run beside the pipeline (the sink's writer thread),
#: and with DuckDB's default (one per core) the same inserts took 30-40 % more CPU on the 2-core machine
#: (71-78 vs 41-51 CPU-us per event, bench/README.md): its threads contend with the pipeline's.
WRITE_THREADS = 1
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
#: Held write connections (module docstring): closed after this long without a write ...
HOLD_IDLE_S = 0.5
#: ... or this long after they were opened, even while writes keep coming (readers' worst wait) ...
HOLD_MAX_S = 1.0
#: ... and after a release for age, the next connect waits this long: open_readonly retries every 0.1 s.
READER_GAP_S = 0.15
_BQ_TO_DUCK = {
    "BOOL": "BOOLEAN", "BOOLEAN": "BOOLEAN", "INT64": "BIGINT", "INTEGER": "BIGINT", "FLOAT64": "DOUBLE",
    "FLOAT": "DOUBLE", "NUMERIC": "DECIMAL(38,9)", "BIGNUMERIC": "VARCHAR", "STRING": "VARCHAR",
    "TIMESTAMP": "TIMESTAMP", "DATE": "DATE", "JSON": "JSON", "BYTES": "BLOB",
}
_READ_TYPE = {"JSON": "VARCHAR"}  # read JSON text as text; the JSON column validates it on insert
_BASE_COLUMNS = {"_row_id", "_partition"}  # created with every table; never added by schema evolution
_GRAN = {"HOUR": "hour", "DAY": "day", "MONTH": "month", "YEAR": "year"}


def duck_type(col: ColumnSchema, *, for_read: bool = False) -> str:
    t = (_READ_TYPE.get(col.type) if for_read else None) or _BQ_TO_DUCK.get(col.type, "VARCHAR")
    return f"{t}[]" if col.mode == "REPEATED" else t


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lock_for(path: str) -> threading.Lock:
    key = os.path.abspath(path)
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


class _Held:
    """This process's held write connection to one file (guarded by the file's ``_lock_for`` lock)."""

    __slots__ = ("path", "lock", "con", "opened", "last", "released", "schemas", "closer")

    def __init__(self, path: str, lock: threading.Lock):
        self.path = path
        self.lock = lock
        self.con: Optional[duckdb.DuckDBPyConnection] = None
        self.opened = self.last = 0.0
        self.released = 0.0  # monotonic time of the last release for age (READER_GAP_S)
        self.schemas: dict[str, Optional[TableSchema]] = {}  # table -> schema, valid while the file is held
        self.closer: Optional[threading.Thread] = None

    def close(self) -> None:
        """Close the connection (DuckDB checkpoints on close). Caller holds ``lock``."""
        con, self.con = self.con, None
        self.schemas = {}
        if con is not None:
            con.close()

    def watch(self) -> None:
        """Close the connection once it is idle for HOLD_IDLE_S (a daemon thread while it is open)."""
        while True:
            time.sleep(HOLD_IDLE_S / 4)
            with self.lock:
                if self.con is None:
                    self.closer = None
                    return
                if time.monotonic() - self.last >= HOLD_IDLE_S:
                    self.close()
                    self.closer = None
                    return


_HELD: dict[str, _Held] = {}

#: path -> how many times a writer of this process changed a table's schema in that file: a writer that caches
#: schemas between its statements (``sinks.duckdb_sink._HeldWarehouse``) drops its cache when this moves.
_SCHEMA_EPOCHS: dict[str, int] = {}


def schema_changed(path: str) -> None:
    """Record that a writer of this process changed a table's schema in the file at ``path``."""
    key = os.path.abspath(path)
    with _LOCKS_GUARD:
        _SCHEMA_EPOCHS[key] = _SCHEMA_EPOCHS.get(key, 0) + 1


def schema_epoch(path: str) -> int:
    return _SCHEMA_EPOCHS.get(os.path.abspath(path), 0)


def _held_for(path: str) -> _Held:
    key = os.path.abspath(path)
    lock = _lock_for(path)
    with _LOCKS_GUARD:
        held = _HELD.get(key)
        if held is None:
            held = _HELD[key] = _Held(key, lock)
        return held


def release_held(path: Optional[str] = None) -> None:
    """Close this process's held write connection to ``path`` (every file when None): the job ended, or
    this process is about to open the file otherwise."""
    with _LOCKS_GUARD:
        helds = [h for k, h in _HELD.items() if path is None or k == os.path.abspath(path)]
    for held in helds:
        with held.lock:
            held.close()


atexit.register(release_held)


def open_readonly(path: str, timeout_s: float = 30.0) -> duckdb.DuckDBPyConnection:
    """Open the warehouse for reading, waiting while a writer holds the file lock."""
    release_held(path)  # this process's own held writer, if any: a read-only connection cannot coexist with it
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return duckdb.connect(path, read_only=True)
        except duckdb.IOException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class DuckDBWarehouse:
    """Writes batches of rows, aggregates and dead letters into one DuckDB file."""

    def __init__(self, spec: WarehouseSpec, tables: Mapping[str, TableSpec],
                 modes: Mapping[str, SchemaMode], lock_timeout_s: float = 120.0, keep_open: bool = False):
        self.spec = spec
        self.path = spec.path
        self.tables = dict(tables)
        self.modes = dict(modes)
        self._lock = _lock_for(self.path)
        self._timeout = lock_timeout_s
        # keep_open: share this process's held write connection (module docstring); the streaming sink
        self._held: Optional[_Held] = _held_for(self.path) if keep_open else None
        self._keys: tuple = (None, {})  # (connection, {table: has a PRIMARY KEY}) (_has_key)

    # -- connection -------------------------------------------------------------------------------
    def _connect(self) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self._timeout
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(self.path)
            except duckdb.IOException as exc:  # another process holds the file: transient, bounded retry
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            # a SET, not a connect-time config: another connection of this process to the same file (a reader)
            # must not fail on "different configuration"
            con.execute(f"SET threads = {WRITE_THREADS}")
            return con

    def _open_writer(self) -> duckdb.DuckDBPyConnection:
        """A write connection kept past one write (the held ones): the metadata tables ensured, closed again
        if that fails."""
        con = self._connect()
        try:
            self._ensure_meta(con)
        except BaseException:
            con.close()
            raise
        return con

    def _with_conn(self, fn):
        if self._held is not None:
            return self._with_held(fn)
        with self._lock:
            con = self._connect()
            try:
                self._ensure_meta(con)
                return fn(con)
            finally:
                con.close()

    def _with_held(self, fn):
        held = self._held
        with held.lock:
            now = time.monotonic()
            if held.con is not None and now - held.opened >= HOLD_MAX_S:
                held.close()  # checkpoint, and let a waiting reader in (READER_GAP_S)
                held.released = now
            if held.con is None:
                gap = held.released + READER_GAP_S - now
                if gap > 0:
                    time.sleep(gap)
                held.con, held.opened = self._open_writer(), time.monotonic()
                if held.closer is None:
                    held.closer = threading.Thread(target=held.watch, name="duckdb-held-closer", daemon=True)
                    held.closer.start()
            try:
                return fn(held.con)
            except BaseException:
                held.close()  # a failed write leaves nothing cached behind (schemas re-read on the next connect)
                raise
            finally:
                held.last = time.monotonic()

    def _ensure_meta(self, con) -> None:
        dl, ag = _q(self.spec.dead_letter_table), _q(self.spec.aggregates_table)
        con.execute("CREATE TABLE IF NOT EXISTS _headwater_schemas (table_name VARCHAR, version BIGINT, "
                    "schema_json VARCHAR, updated_at TIMESTAMP, PRIMARY KEY (table_name, version))")
        con.execute("CREATE TABLE IF NOT EXISTS _headwater_tables (table_name VARCHAR PRIMARY KEY, partner VARCHAR, "
                    "partition_column VARCHAR, partition_granularity VARCHAR, clustering VARCHAR[])")
        con.execute(f"CREATE TABLE IF NOT EXISTS {dl} (id VARCHAR PRIMARY KEY, partner VARCHAR, source VARCHAR, "
                    "coords VARCHAR, payload BLOB, payload_preview VARCHAR, payload_ref VARCHAR, error_class VARCHAR, "
                    "reason VARCHAR, message VARCHAR, step VARCHAR, event_time TIMESTAMP, processing_time TIMESTAMP)")
        con.execute(f"CREATE TABLE IF NOT EXISTS {ag} (partner VARCHAR, aggregate VARCHAR, key VARCHAR, "
                    "\"window\" VARCHAR, metrics JSON, watermark TIMESTAMP, version BIGINT, emitted_at TIMESTAMP, "
                    "final BOOLEAN, PRIMARY KEY (partner, aggregate, key, \"window\", version))")

    # -- schemas ----------------------------------------------------------------------------------
    def _schema_cache(self, con) -> Optional[dict]:
        """The table -> schema cache valid for ``con`` (the held connection's), or None: read every time."""
        held = self._held
        return held.schemas if held is not None and held.con is con else None

    def _schema_of(self, con, table: str) -> Optional[TableSchema]:
        """The table's current schema: from the connection's cache when it has it."""
        cache = self._schema_cache(con)
        if cache is not None and table in cache:
            return cache[table]
        schema = self._load_schema(con, table)
        if cache is not None and schema is not None:
            cache[table] = schema
        return schema

    def _remember_schema(self, con, table: str, schema: TableSchema) -> None:
        cache = self._schema_cache(con)  # as checked before this change moves the file's schema epoch
        schema_changed(self.path)
        if cache is not None:
            cache[table] = schema

    @staticmethod
    def _load_schema(con, table: str) -> Optional[TableSchema]:
        row = con.execute("SELECT schema_json FROM _headwater_schemas WHERE table_name = ? "
                          "ORDER BY version DESC LIMIT 1", [table]).fetchone()
        return TableSchema.from_json(row[0]) if row else None

    def _create_table(self, con, table: str, partner: str, spec: TableSpec) -> TableSchema:
        schema = TableSchema(columns=(), version=0)
        is_child = table != spec.name
        con.execute(create_table_sql(table, keyed=not is_child))
        con.execute("INSERT OR IGNORE INTO _headwater_tables VALUES (?, ?, ?, ?, ?)",
                    [table, partner, "_event_time" if is_child else spec.partition_column,
                     spec.partition_granularity, [] if is_child else list(spec.clustering)])
        return schema

    def _apply_schema(self, con, table: str, old: TableSchema, new: TableSchema) -> None:
        have = {c.name for c in old.columns} | _BASE_COLUMNS
        for col in new.columns:
            if col.name not in have:
                con.execute(f"ALTER TABLE {_q(table)} ADD COLUMN {_q(col.name)} {duck_type(col)}")
        con.execute("INSERT OR IGNORE INTO _headwater_schemas VALUES (?, ?, ?, ?)",
                    [table, new.version, new.to_json(), datetime.now(timezone.utc).replace(tzinfo=None)])

    # -- writes -----------------------------------------------------------------------------------
    def write_rows(self, rows: Sequence[TableRow]) -> list[DeadLetter]:
        """Insert rows, idempotent per event (module docstring: an event's rows are stored with its main row,
        in one transaction, or not at all). Returns dead letters for rows the warehouse rejected."""
        if not rows:
            return []
        tables = rows.tables if isinstance(rows, PreparedRows) else _by_table(rows)

        def go(con) -> list[DeadLetter]:
            dead: list[DeadLetter] = []
            plans: list[_Plan] = []
            for table, (batch, groups) in tables.items():
                dead += self._prepare_table(con, table, batch, plans, groups)
            if plans:
                dead += self._store(con, plans)
            return dead

        return self._with_conn(go)

    def _prepare_table(self, con, table: str, batch: list[TableRow], plans: list,
                       groups: Optional[dict] = None) -> list[DeadLetter]:
        """Reconcile a table's rows with its schema (creating and evolving it: DDL, committed on its own as
        before) and append the insert statements they need to ``plans``. Returns the rows ``freeze`` refuses.
        ``groups``: the batch's rows by their types, with their Arrow columns (``prepare_rows``), or None."""
        partner = batch[0].partner
        spec = self.tables[partner]
        mode = self.modes.get(partner, SchemaMode.EVOLVE)
        schema = self._schema_of(con, table)
        if schema is None:
            schema = self._create_table(con, table, partner, spec)
        start = schema
        dead: list[DeadLetter] = []
        ready: list[TableRow] = []
        ready_recs: list[dict] = []
        types_of: dict[bytes, dict] = {}  # rows of a table mostly share their types' bytes: decode each once
        # Types that fit the schema as is (reconcile's fast path). Columns are only ever added, so a fit
        # stays a fit for the rest of the batch: those rows skip reconcile (same result, it returns them as is).
        fits: dict[bytes, list[TableRow]] = {}  # ... and those rows, grouped by their types: written as JSON text
        loads = orjson.loads
        for r in batch:
            group = fits.get(r.types)
            if group is not None:
                group.append(r)
                continue
            types = types_of.get(r.types)
            if types is None:
                types = types_of[r.types] = loads(r.types)
            row = loads(r.row)
            rec = reconcile(schema, row, types, mode)
            if rec.columns is row and rec.schema is schema and not rec.conflicts:
                fits[r.types] = [r]
                continue
            if rec.conflicts and mode == SchemaMode.FREEZE:
                c = rec.conflicts[0]
                more = f" (+{len(rec.conflicts) - 1} more)" if len(rec.conflicts) > 1 else ""
                dead.append(self._row_dead(r, Reason.TYPE_CONFLICT, "TypeConflict",
                                           f"table {table}: column {c.column!r} is {c.existing_type} but the value is "
                                           f"{c.new_type}{more}", r.row))
                continue
            schema = rec.schema
            cols = dict(rec.columns)
            cols["_row_id"] = r.row_id
            ready.append(r)
            ready_recs.append(cols)
        if schema.version != start.version or schema.columns != start.columns:
            self._apply_schema(con, table, start, schema)
            self._remember_schema(con, table, schema)
        main = table == spec.name
        pcol = spec.partition_column if main else "_event_time"
        gran = _GRAN[spec.partition_granularity]
        dict_types = _dict_read_types(schema)
        for types_bytes, group in fits.items():
            read_types = _json_read_types(schema, types_of[types_bytes])
            if read_types is None:  # cannot be read as JSON text as is: the dict path decides
                ready += group
                ready_recs += [_with_id(loads(r.row), r.row_id) for r in group]
            else:
                plan = _Plan(table, main, group, None, read_types, pcol, gran)
                pre = groups.get(types_bytes) if groups else None
                if pre is not None and len(pre.rows) == len(group):  # the group is a suffix of pre.rows: the same
                    plan.arrow, plan.events = pre.arrow, pre.events
                plans.append(plan)
        if ready:
            plans.append(_Plan(table, main, ready, ready_recs, dict_types, pcol, gran))
        return dead

    def _has_key(self, con, table: str) -> bool:
        """Whether the table has a PRIMARY KEY on ``_row_id``: every main table; child tables only in warehouses
        written before event-level keys (module docstring). Cached per connection."""
        cache = self._keys
        if cache[0] is not con:
            cache = self._keys = (con, {})
        known = cache[1].get(table)
        if known is None:
            known = cache[1][table] = bool(con.execute(
                "SELECT count(*) FROM duckdb_constraints() WHERE database_name = current_database() AND "
                "schema_name = 'main' AND table_name = ? AND constraint_type = 'PRIMARY KEY'", [table]).fetchone()[0])
        return known

    def _store(self, con, plans: list) -> list[DeadLetter]:
        """Run ``plans`` in one transaction (``_transaction``). A statement that fails rolls the transaction
        back: a stored main row id (a re-run) makes the next try careful; a value a table refuses is found
        (``_probe``) and dead-lettered, and the rest is tried again."""
        dead: list[DeadLetter] = []
        careful = _careful_first([p.table for p in plans if p.main])
        for _ in range(3 * len(plans) + 2):
            try:
                self._transaction(con, plans, careful)
            except _PlanFailed as failed:
                plan, exc = plans[failed.index], failed.cause
                if isinstance(exc, duckdb.ConstraintException) and not careful:
                    careful = True
                    _conflict(plan.table)
                    continue
                if plan.recs is None:  # JSON text refused: the dict path decides, as the statement did before
                    plans[failed.index] = plan.as_dicts(_dict_read_types(self._schema_of(con, plan.table)))
                    continue
                good, bad = self._probe(con, plan)
                if not bad:
                    raise exc
                for r, why in bad:
                    dead.append(self._row_dead(r, Reason.SINK_REJECTED, type(why).__name__,
                                               f"table {plan.table}: warehouse rejected the row: {str(why)[:500]}", r.row))
                if good is None:
                    del plans[failed.index]
                else:
                    plans[failed.index] = good
                if not plans:
                    return dead
                continue
            if not careful:
                _clean([p.table for p in plans if p.main])
            return dead
        raise RuntimeError(f"{self.path}: a write did not settle after {3 * len(plans) + 2} tries")

    def _transaction(self, con, plans: list, careful: bool) -> None:
        """One write's statements in one transaction: main rows first, then child rows of the events whose
        main row this write stored. Optimistic (``careful`` False): plain INSERTs, a stored main row id fails
        the statement; careful: main rows ``INSERT OR IGNORE ... RETURNING`` the stored ones. Child rows whose
        main row is not in this write (a rejected main row) go in only where their ``_row_id`` is absent."""
        mains = [p for p in plans if p.main]
        if len(mains) == 1 and mains[0].events is not None:
            events = mains[0].events  # prepared by the caller's thread (prepare_rows); not changed below
        else:
            events = {(r.partner, r.event_id) for p in mains for r in p.rows}
        index = 0
        new = set() if careful else events  # the events whose main row this write stores
        con.execute("BEGIN TRANSACTION")
        try:
            for index, p in enumerate(plans):
                if not p.main:
                    continue
                if careful:
                    stored: list = []
                    p.run(con, "returning", stored)
                    of = {r.row_id: (r.partner, r.event_id) for r in p.rows}
                    new.update(of[i] for i in stored)
                else:
                    p.run(con, "plain")
            for index, p in enumerate(plans):
                if p.main:
                    continue
                keyed = self._has_key(con, p.table)
                of_events = p.events if p.events is not None else {(r.partner, r.event_id) for r in p.rows}
                if of_events <= new:  # the common case: every child row's main row is stored by this write
                    with_main, orphans = p, None
                else:
                    with_main = p.subset(lambda r: (r.partner, r.event_id) in new)
                    orphans = None if of_events <= events else p.subset(lambda r: (r.partner, r.event_id) not in events)
                if with_main is not None:
                    with_main.run(con, "ignore" if careful and keyed else "plain")
                if orphans is not None:
                    orphans.run(con, "ignore" if keyed else "absent")
            con.execute("COMMIT")
        except BaseException as exc:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            if isinstance(exc, duckdb.Error):
                raise _PlanFailed(index, exc) from exc
            raise

    def _probe(self, con, plan: "_Plan") -> "tuple[Optional[_Plan], list]":
        """Which rows of ``plan`` its table refuses: inserted into an empty temporary copy of the table (the
        real table untouched), all at once and then one by one. Returns (the plan without them or None,
        [(row, error)])."""
        probe = "temp.main._hw_probe"
        con.execute(f"CREATE OR REPLACE TEMP TABLE _hw_probe AS SELECT * FROM {_q(plan.table)} LIMIT 0")
        try:
            try:
                plan.run(con, "plain", target=probe)
                return plan, []
            except duckdb.Error:
                pass
            keep, bad = [], []
            for k, r in enumerate(plan.rows):
                try:
                    plan.pick([k]).run(con, "plain", target=probe)
                    keep.append(k)
                except duckdb.Error as exc:
                    bad.append((r, exc))
            return (plan.pick(keep) if keep else None), bad
        finally:
            con.execute("DROP TABLE IF EXISTS temp.main._hw_probe")

    @staticmethod
    def _row_dead(r: TableRow, reason: str, cls: str, msg: str, payload: bytes) -> DeadLetter:
        return DeadLetter(partner=r.partner, source="warehouse", coords=f"table:{r.table}/{r.row_id}",
                          payload=payload, payload_ref="sha256:" + hashlib.sha256(payload).hexdigest(),
                          error_class=cls, reason=reason, message=msg, step="WriteWarehouse",
                          event_time_us=r.event_time_us, processing_time_us=int(time.time() * 1_000_000))

    def write_dead_letters(self, dls: Iterable[DeadLetter]) -> int:
        recs = []
        for d in dls:
            ident = hashlib.sha256("\x1f".join(
                [d.partner, d.coords, d.payload_ref, d.reason, d.step]).encode()).hexdigest()[:32]
            recs.append({"id": ident, "partner": d.partner, "source": d.source, "coords": d.coords,
                         "payload": base64.b64encode(d.payload).decode(),
                         "payload_preview": d.payload[:1000].decode("utf-8", "replace"),
                         "payload_ref": d.payload_ref, "error_class": d.error_class, "reason": d.reason,
                         "message": d.message, "step": d.step, "event_time": d.event_time_us,
                         "processing_time": d.processing_time_us})
        if recs:
            self._with_conn(lambda con: _insert_any(
                con, self.spec.dead_letter_table, recs,
                {"id": "VARCHAR", "partner": "VARCHAR", "source": "VARCHAR", "coords": "VARCHAR",
                 "payload": "VARCHAR", "payload_preview": "VARCHAR", "payload_ref": "VARCHAR",
                 "error_class": "VARCHAR", "reason": "VARCHAR", "message": "VARCHAR", "step": "VARCHAR",
                 "event_time": "BIGINT", "processing_time": "BIGINT"},
                {"payload": "from_base64(payload)", "event_time": "make_timestamp(event_time)",
                 "processing_time": "make_timestamp(processing_time)"}))
        return len(recs)

    def write_aggregates(self, aggs: Iterable[AggregateRow]) -> int:
        recs = [{"partner": a.partner, "aggregate": a.aggregate, "key": a.key, "window": a.window,
                 "metrics": a.metrics.decode(), "watermark": a.watermark_us, "version": a.version,
                 "emitted_at": a.emitted_us, "final": a.final} for a in aggs]
        if recs:
            self._with_conn(lambda con: _insert_any(
                con, self.spec.aggregates_table, recs,
                {"partner": "VARCHAR", "aggregate": "VARCHAR", "key": "VARCHAR", "window": "VARCHAR",
                 "metrics": "VARCHAR", "watermark": "BIGINT", "version": "BIGINT", "emitted_at": "BIGINT",
                 "final": "BOOLEAN"},
                {"watermark": "make_timestamp(watermark)", "emitted_at": "make_timestamp(emitted_at)"}))
        return len(recs)


class _PlanFailed(Exception):
    """A statement of a write's transaction failed (the transaction is rolled back): which plan, and why."""

    def __init__(self, index: int, cause: duckdb.Error):
        super().__init__(str(cause))
        self.index, self.cause = index, cause


class _Plan:
    """One insert statement of a write: rows of one table, as JSON text (``recs`` None: every row has exactly
    the columns of ``read_types``) or as reconciled dicts (``recs``, parallel to ``rows``)."""

    __slots__ = ("table", "main", "rows", "recs", "read_types", "pcol", "gran", "arrow", "events")

    def __init__(self, table: str, main: bool, rows: list, recs: Optional[list], read_types: dict, pcol: str,
                 gran: str):
        self.table, self.main, self.rows, self.recs = table, main, rows, recs
        self.read_types, self.pcol, self.gran = read_types, pcol, gran
        # what prepare_rows built for exactly these rows (JSON text plans only), or None: built when needed
        self.arrow: Optional[object] = None  # pyarrow Table (_row_id, _doc)
        self.events: Optional[set] = None  # {(partner, event_id)} of the rows

    @property
    def part(self) -> str:
        """SQL for ``_partition``: the partition column truncated to the granularity (NULL without it)."""
        return f"date_trunc('{self.gran}', {_q(self.pcol)})" if self.pcol in self.read_types else "NULL::TIMESTAMP"

    def _with(self, rows: list, recs: Optional[list], read_types: dict) -> "_Plan":
        return _Plan(self.table, self.main, rows, recs, read_types, self.pcol, self.gran)

    def pick(self, ks: list) -> "_Plan":
        return self._with([self.rows[k] for k in ks], None if self.recs is None else [self.recs[k] for k in ks],
                          self.read_types)

    def subset(self, keep) -> "Optional[_Plan]":
        """The plan for the rows ``keep`` accepts: itself when it accepts all, None when none."""
        ks = [k for k, r in enumerate(self.rows) if keep(r)]
        if len(ks) == len(self.rows):
            return self
        return self.pick(ks) if ks else None

    def as_dicts(self, read_types: dict) -> "_Plan":
        """The same rows through the dict path (its conversions decide what a JSON-text statement refused)."""
        if self.recs is not None:
            return self
        return self._with(self.rows, [_with_id(orjson.loads(r.row), r.row_id) for r in self.rows], read_types)

    def run(self, con, mode: str, returned: Optional[list] = None, target: Optional[str] = None) -> None:
        # Sorted by partition only when the write fills a row group: DuckDB's zone maps are per row group, and a
        # row group of smaller sorted writes spans their whole range anyway (tested: 10,000-row sorted writes of
        # 90 days' rows left every row group's min/max at the full 90 days), so their sort was work for nothing
        # (cheap, though: the 1M-event bench's INSERTs took the same time within noise, bench/README.md).
        order = "_partition" if len(self.rows) >= ROW_GROUP_ROWS else None
        if self.recs is None:
            _json_insert(con, self.table, self.rows, self.read_types, self.part, order_by=order,
                         mode=mode, returned=returned, target=target, arrow=self.arrow)
        elif not _arrow_insert(con, self.table, self.recs, self.read_types, {}, extra={"_partition": self.part},
                               order_by=order, mode=mode, returned=returned, target=target):
            _bulk_insert(con, self.table, self.recs, self.read_types, {}, extra={"_partition": self.part},
                         order_by=order, mode=mode, returned=returned, target=target)


def _with_id(cols: dict, row_id: str) -> dict:
    cols["_row_id"] = row_id
    return cols


def _json_read_types(schema: TableSchema, types: dict) -> Optional[dict]:
    """Read types for rows with exactly these columns as JSON text, or None when a column is not (yet) in
    ``schema`` (the dict path then decides)."""
    read_types = {"_row_id": "VARCHAR"}
    for name in types:
        if name == "_row_id":  # a child row's id is one of its columns too: the same id, taken from the row
            continue
        col = schema.get(name)
        if col is None or name in _BASE_COLUMNS:
            return None
        read_types[name] = duck_type(col, for_read=True)
    return read_types


def _dict_read_types(schema: TableSchema) -> dict:
    cols = [ColumnSchema("_row_id", "STRING", "NULLABLE"), *(c for c in schema.columns if c.name not in _BASE_COLUMNS)]
    return {c.name: duck_type(c, for_read=True) for c in cols}


def _insert_any(con, table: str, recs: list[dict], read_types: dict[str, str], exprs: dict[str, str]) -> None:
    if not _arrow_insert(con, table, recs, read_types, exprs):
        _bulk_insert(con, table, recs, read_types, exprs)


def _bulk_insert(con, table: str, recs: list[dict], read_types: dict[str, str], exprs: dict[str, str],
                 extra: Optional[dict[str, str]] = None, order_by: Optional[str] = None, mode: Optional[str] = None,
                 returned: Optional[list] = None, target: Optional[str] = None) -> None:
    """INSERT OR IGNORE many records at once through a temporary NDJSON file (DuckDB's executemany
    is row-at-a-time and was 1,000x slower here: 143 s for 12,000 aggregate rows).

    ``read_types``: column -> DuckDB type to read it as; ``exprs``: column -> SQL computing the stored
    value from the read one; ``extra``: further columns computed from the read ones."""
    extra = extra or {}
    names = list(read_types) + list(extra)
    col_types = "{" + ", ".join(f"{_sql_str(n)}: {_sql_str(t)}" for n, t in read_types.items()) + "}"
    select = ", ".join(f"{exprs.get(n) or extra.get(n) or _q(n)} AS {_q(n)}" for n in names)
    order = f" ORDER BY {_q(order_by)}" if order_by else ""
    fd, tmp = tempfile.mkstemp(prefix="headwater-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\n".join(orjson.dumps(r) for r in recs) + b"\n")
        _run_insert(con, table, f"({', '.join(_q(n) for n in names)})", f"SELECT {select} "
                    f"FROM read_json({_sql_str(tmp)}, columns={col_types}, format='newline_delimited', "
                    f"maximum_object_size=134217728){order}", mode, returned, target)
    finally:
        os.unlink(tmp)


#: ``INSERT OR IGNORE`` costs more than a plain ``INSERT`` into the same PRIMARY KEY table (25-35 % more
#: CPU per row, DuckDB 1.5: the conflict check looks every key up before the insert looks it up again;
#: bench/README.md), and almost every statement of a run meets no stored row id. So a statement is first
#: tried as a plain INSERT; a key that is already stored fails it as a whole (DuckDB rolls the statement
#: back: nothing of it is written) and it runs again as INSERT OR IGNORE: the same rows end up stored
#: either way. After such a conflict the table's next statements go straight to INSERT OR IGNORE for a
#: while (a re-run meets stored ids in every statement), twice as long after each conflict in a row.
_IGNORE_FIRST: dict[str, list] = {}  # table -> [statements left to run as INSERT OR IGNORE, next back-off]
_BACKOFF_START, _BACKOFF_MAX = 8, 1024


def _insert_or_ignore(con, table: str, tail: str) -> None:
    """``INSERT OR IGNORE INTO table <tail>``, tried as a plain INSERT first (above)."""
    if _careful_first([table]):
        con.execute(f"INSERT OR IGNORE INTO {_q(table)} {tail}")
        return
    try:
        con.execute(f"INSERT INTO {_q(table)} {tail}")
    except duckdb.ConstraintException:
        _conflict(table)
        con.execute(f"INSERT OR IGNORE INTO {_q(table)} {tail}")
        return
    _clean([table])  # a clean plain insert: back to plain first, the back-off starts over


def _conflict(table: str) -> None:
    """A plain INSERT met a stored row id in ``table``: back off (``_IGNORE_FIRST``), twice as long as the
    last time while conflicts repeat."""
    state = _IGNORE_FIRST.get(table)
    backoff = _BACKOFF_START if state is None else min(state[1] * 2, _BACKOFF_MAX)
    _IGNORE_FIRST[table] = [backoff, backoff]


def _careful_first(tables: list) -> bool:
    """Whether a write into these tables starts careful, i.e. INSERT OR IGNORE (one of them is backing off;
    counts it down)."""
    careful = False
    for t in set(tables):
        state = _IGNORE_FIRST.get(t)
        if state is not None and state[0] > 0:
            state[0] -= 1
            careful = True
    return careful


def _clean(tables: list) -> None:
    """A plain write into these tables met no stored id: their back-off is over."""
    for t in tables:
        _IGNORE_FIRST.pop(t, None)


def _run_insert(con, table: str, cols: str, select: str, mode: Optional[str], returned: Optional[list],
                target: Optional[str]) -> None:
    """``INSERT INTO <target or table> <cols> <select>`` as ``mode``: None, INSERT OR IGNORE tried as a plain
    INSERT first (``_insert_or_ignore``); "plain"; "ignore" (INSERT OR IGNORE); "returning" (INSERT OR
    IGNORE, the stored rows' ``_row_id`` appended to ``returned``); "absent" (only rows whose ``_row_id`` the
    table does not hold: for a table without a key)."""
    if mode is None:
        _insert_or_ignore(con, table, f"{cols} {select}")
        return
    into = target or _q(table)
    if mode == "plain":
        con.execute(f"INSERT INTO {into} {cols} {select}")
    elif mode == "ignore":
        con.execute(f"INSERT OR IGNORE INTO {into} {cols} {select}")
    elif mode == "returning":
        returned.extend(r[0] for r in con.execute(
            f"INSERT OR IGNORE INTO {into} {cols} {select} RETURNING _row_id").fetchall())
    elif mode == "absent":
        con.execute(f"INSERT INTO {into} {cols} SELECT * FROM ({select}) AS b "
                    f"WHERE NOT EXISTS (SELECT 1 FROM {into} AS l WHERE l._row_id = b._row_id)")
    else:
        raise ValueError(f"unknown insert mode {mode!r}")


#: DuckDB's rows per row group (its zone maps' unit): a write this large is sorted by ``_partition``.
ROW_GROUP_ROWS = 122_880


def create_table_sql(table: str, keyed: bool) -> str:
    """A partner table's DDL: main tables keep ``_row_id`` as PRIMARY KEY (the event's key), child tables
    hold it as a plain column (module docstring: DuckDB's key index stays in memory, ~71 bytes per key)."""
    key = " PRIMARY KEY" if keyed else ""
    return f"CREATE TABLE IF NOT EXISTS {_q(table)} (_row_id VARCHAR{key}, _partition TIMESTAMP)"


def _json_insert(con, table: str, rows: list, read_types: dict[str, str], partition: str,
                 order_by: Optional[str] = None, mode: Optional[str] = None, returned: Optional[list] = None,
                 target: Optional[str] = None, arrow=None) -> None:
    """INSERT OR IGNORE rows (TableRow: ``row_id`` and ``row``, its columns' JSON) that all have exactly the
    columns of ``read_types``, through an Arrow table of (row id, JSON text) that DuckDB turns into typed
    columns with ``json_transform_strict``: the JSON reader's conversions (as ``read_json`` applied them to
    the NDJSON file this replaced; ``tests/sinks/test_duckdb_arrow.py`` compares the two), no per-row
    parsing in Python, no temporary file. ``arrow``: that table, built beforehand (``prepare_rows``)."""
    structure = orjson.dumps({n: t for n, t in read_types.items() if n != "_row_id"}).decode()
    if arrow is None:
        arrow = _json_arrow(rows)
    names = ", ".join(_q(n) for n in read_types)
    order = f" ORDER BY {_q(order_by)}" if order_by else ""
    view = "_hw_json_batch"
    con.register(view, arrow)  # noqa: F841 - read by name in the SQL below
    try:
        inner = "_row_id" + (f", unnest(json_transform_strict(_doc, {_sql_str(structure)}))" if structure != "{}" else "")
        _run_insert(con, table, f'({names}, "_partition")',
                    f'SELECT {names}, {partition} AS "_partition" FROM (SELECT {inner} FROM {view}){order}',
                    mode, returned, target)
    finally:
        con.unregister(view)


def _json_arrow(rows: list):
    """The Arrow table ``_json_insert`` reads: (``_row_id``, ``_doc``: the row's JSON text)."""
    import pyarrow as pa

    return pa.table({"_row_id": pa.array([r.row_id for r in rows], pa.string()),
                     "_doc": pa.array([r.row for r in rows], pa.binary()).cast(pa.string())})


def _by_table(rows: Iterable[TableRow]) -> dict:
    """table -> (its rows, None): one row per ``row_id`` (the last one, at the first one's place)."""
    by_table: dict[str, dict[str, TableRow]] = {}
    for r in rows:
        by_table.setdefault(r.table, {})[r.row_id] = r
    return {table: (list(batch.values()), None) for table, batch in by_table.items()}


class _Group:
    """A table's rows of a write that share their types' bytes, with what their statement needs."""

    __slots__ = ("rows", "arrow", "events")

    def __init__(self, rows: list):
        self.rows = rows
        self.arrow = _json_arrow(rows)
        self.events = {(r.partner, r.event_id) for r in rows}


class PreparedRows(list):
    """A write's rows (a list of TableRow) with what ``write_rows`` first computes from them: ``tables``,
    table -> (its rows, {types bytes: _Group}). Built by ``prepare_rows`` in the thread that makes the
    write, so that the writer thread, the bounded job's slowest part, spends its time in DuckDB: each of
    its Python steps waits for the interpreter's lock behind the pipeline thread (bench/README.md, "Ninth
    pass"). ``write_rows`` stores the same rows whether given these or the plain list."""

    __slots__ = ("tables",)


def prepare_rows(rows: Iterable[TableRow]) -> PreparedRows:
    """``rows`` as a PreparedRows (above)."""
    out = PreparedRows(rows)
    tables = {}
    for table, (batch, _) in _by_table(out).items():
        by_types: dict[bytes, list] = {}
        for r in batch:
            g = by_types.get(r.types)
            if g is None:
                by_types[r.types] = [r]
            else:
                g.append(r)
        tables[table] = (batch, {t: _Group(g) for t, g in by_types.items()})
    out.tables = tables
    return out


#: DuckDB read types that travel as native Arrow arrays; the others (TIMESTAMP, DATE, DECIMAL...) travel as
#: text and are CAST in SQL, the same string-to-type conversion read_json applies to JSON strings.
_ARROW_NATIVE = {"BIGINT": "int64", "DOUBLE": "float64", "BOOLEAN": "bool_", "VARCHAR": "string"}
_ARROW_CAST = ("TIMESTAMP", "DATE", "DECIMAL(38,9)")


def _arrow_insert(con, table: str, recs: list[dict], read_types: dict[str, str], exprs: dict[str, str],
                  extra: Optional[dict[str, str]] = None, order_by: Optional[str] = None, mode: Optional[str] = None,
                  returned: Optional[list] = None, target: Optional[str] = None) -> bool:
    """``_bulk_insert`` through an Arrow table instead of NDJSON text: same statement, same conversions
    (``tests/sinks/test_duckdb_arrow.py`` compares the two on every column type). Returns False, having
    written nothing, when a column's type or a value does not map exactly (BLOB columns, a non-string in
    a text column, an int beyond INT64...): the caller then uses the NDJSON path, which decides."""
    import pyarrow as pa

    arrays = []
    casts = []
    for name, t in read_types.items():
        base, rep = (t[:-2], True) if t.endswith("[]") else (t, False)
        if base in _ARROW_NATIVE:
            at = getattr(pa, _ARROW_NATIVE[base])()
            cast = None
        elif base in _ARROW_CAST:
            at = pa.string()
            cast = t
        else:
            return False
        if rep:
            at = pa.list_(at)
        try:
            arrays.append(pa.array([r.get(name) for r in recs], type=at))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            return False
        casts.append(f"CAST({_q(name)} AS {cast}) AS {_q(name)}" if cast else _q(name))
    extra = extra or {}
    names = list(read_types) + list(extra)
    select = ", ".join(f"{exprs.get(n) or extra.get(n) or _q(n)} AS {_q(n)}" for n in names)
    order = f" ORDER BY {_q(order_by)}" if order_by else ""
    arrow = pa.Table.from_arrays(arrays, names=list(read_types))  # noqa: F841 - read by name in the SQL below
    view = "_hw_arrow_batch"
    con.register(view, arrow)
    try:
        _run_insert(con, table, f"({', '.join(_q(n) for n in names)})",
                    f"SELECT {select} FROM (SELECT {', '.join(casts)} FROM {view}){order}", mode, returned, target)
    finally:
        con.unregister(view)
    return True


def _ts(us: Optional[int]) -> Optional[datetime]:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1_000_000, tz=timezone.utc).replace(tzinfo=None)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"
