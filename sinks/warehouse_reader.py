"""Read the warehouse back: aggregate inputs from the rows, and the latest aggregate rows. No Beam.

``headwater verify`` recomputes every aggregate from the rows (``state.recompute``) and
compares it with the latest aggregate row per (partner, aggregate, key, window); a restart
can rebuild a key's state the same way. Both warehouses: the DuckDB file and BigQuery
(``contract.warehouse.endpoint`` for the local emulator, else ADC and the public API).

:func:`aggregate_inputs_from_warehouse` yields the :class:`AggregateInput` values the stream
built for each event (``ingest/flatten_step.py``): the aggregate key (``_user_id`` or a
flattened column, ``str()`` of it; events whose key is NULL or an array are skipped, as
the stream skips them) and ``values`` = the orjson object of the metric columns, with the
values typed as the flattener produced them, before the sink fitted them to the table:

* TIMESTAMP -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` text, DATE -> ``YYYY-MM-DD``, NUMERIC -> the
  integer's decimal text, JSON -> JSON text, REPEATED -> a list, others as stored;
* a value the sink moved to a variant column (``<col>__v_<type>``, schema_mode evolve) is
  read back from it under ``<col>``;
* rows the sink rejected (dead letters of source ``warehouse`` for the main table, e.g. a
  freeze-mode type conflict) were aggregated by the stream: they are read from the dead
  letter's payload (the row exactly as the stream saw it) unless the row exists after all;
* events the stream's aggregation rejected as ``late`` (dead letters of source ``aggregate``)
  are left out (``exclude_late``): the state never took them.

Known loss (docs/state.md, "Verify"): a value the sink *widened* to fit an existing column
(an integer into a FLOAT64 column, a DATE into a TIMESTAMP column, a number into a STRING
column) is read as stored, so ``12`` reads as ``12.0``; numeric metrics compare equal, but
a ``distinct`` count over a column holding both ``12`` and ``12.0`` may differ.

Rows come in (event time, event id) order, fetched in pages (never the whole table in memory).
"""
from __future__ import annotations

import heapq
import re
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence

import orjson

from flatten.records import AggregateInput
from flatten.schema import TableSchema
from sinks.spec import WarehouseSpec

__all__ = ["aggregate_inputs_from_warehouse", "latest_aggregates", "latest_aggregate_rows", "LatestAggregate",
           "WarehouseReadError", "specs_of", "WindowKey"]

WindowKey = tuple[str, str, str, str]  # (partner, aggregate, key, window)
_PAGE = 10_000
_EPOCH = datetime(1970, 1, 1)
_VARIANT = re.compile(r"^(?P<base>.+)__v_(?P<type>bool|int64|float64|numeric|string|timestamp|date|json)"
                      r"(?P<rep>_repeated)?$")


class WarehouseReadError(RuntimeError):
    """The warehouse cannot be read (missing file, unreachable endpoint, no permission)."""


class _Partner(Protocol):  # the parts of ingest.contract.PartnerContract used here (sinks may not import ingest)
    name: str
    table: Any
    aggregates: Sequence[Any]


class _Contract(Protocol):
    warehouse: WarehouseSpec
    partners: Sequence[Any]


class LatestAggregate(NamedTuple):
    metrics: dict
    version: int
    watermark_us: int
    emitted_us: Optional[int]
    final: bool


def specs_of(contract: _Contract, partner: Optional[str] = None) -> dict:
    """``{(partner, aggregate name): AggregateSpec}`` of the contract (as ComputeAggregates takes them)."""
    return {(p.name, a.name): a for p in _partners(contract, partner) for a in p.aggregates}


def _partners(contract: _Contract, partner: Optional[str]) -> list:
    ps = [p for p in contract.partners if partner is None or p.name == partner]
    if partner is not None and not ps:
        raise WarehouseReadError(f"no partner {partner!r} in the contract "
                                 f"(have: {[p.name for p in contract.partners]})")
    return ps


# ------------------------------------------------------------------------------------- values


def _us(v: Any) -> int:
    if isinstance(v, datetime):
        if v.tzinfo is not None:
            v = v.astimezone(timezone.utc).replace(tzinfo=None)
        d = v - _EPOCH
        return (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds
    raise TypeError(f"expected a timestamp, got {type(v).__name__}")


def _scalar(v: Any, t: str) -> Any:
    """A stored scalar -> the JSON value the flattener produced for type ``t``."""
    if v is None:
        return None
    if t == "TIMESTAMP":
        if isinstance(v, str):
            return v
        if v.tzinfo is not None:
            v = v.astimezone(timezone.utc).replace(tzinfo=None)
        return v.isoformat(timespec="microseconds") + "Z"
    if t == "DATE":
        return v.isoformat() if isinstance(v, (date, datetime)) else v
    if t == "NUMERIC":
        if isinstance(v, Decimal):
            return str(int(v)) if v == v.to_integral_value() else str(v.normalize())
        return str(v)
    if t == "JSON":
        return v if isinstance(v, str) else orjson.dumps(v).decode()
    if t == "INT64" and isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _value(v: Any, type_str: str) -> Any:
    if type_str.endswith("[]"):
        if v is None:
            return None
        t = type_str[:-2]
        return [_scalar(x, t) for x in v]
    return _scalar(v, type_str)


class _ReadPlan(NamedTuple):
    """What to read from one partner's main table and how to turn a row into inputs."""

    partner: str
    table: str
    select: tuple[str, ...]  # stored columns, in order
    types: tuple[str, ...]  # their type strings ("INT64", "STRING[]")
    sources: dict  # logical column -> [index into select, base column first then variants]
    aggs: tuple  # (name, key column or None for user_id, metric columns)


def _metric_columns(spec) -> tuple[str, ...]:
    cols: list[str] = []
    for m in spec.metrics:
        if m.column and m.column not in cols:
            cols.append(m.column)
    return tuple(cols)


def _read_plan(p, schema: TableSchema) -> _ReadPlan:
    aggs = tuple((a.name, None if a.key == "user_id" else a.key, _metric_columns(a)) for a in p.aggregates)
    wanted: list[str] = []
    for _, key, cols in aggs:
        for c in ((key,) if key else ()) + cols:
            if c not in wanted:
                wanted.append(c)
    variants: dict[str, list[str]] = {}
    for c in schema.columns:
        m = _VARIANT.match(c.name)
        if m and m.group("base") in wanted:
            variants.setdefault(m.group("base"), []).append(c.name)
    select = ["_event_id", "_user_id", "_event_time"]
    sources: dict[str, list[int]] = {}
    for c in wanted:
        for stored in ([c] if c in schema else []) + sorted(variants.get(c, [])):
            if stored not in select:
                select.append(stored)
            sources.setdefault(c, []).append(select.index(stored))
    types = tuple(schema.type_of(c) or "STRING" for c in select)
    return _ReadPlan(p.name, p.table.name, tuple(select), types, sources, aggs)


def _inputs_of_row(plan: _ReadPlan, row: Sequence[Any]) -> Iterator[AggregateInput]:
    event_id, user_id, et = row[0], row[1], row[2]
    if event_id is None or et is None:
        return
    t_us = _us(et)
    main: dict[str, Any] = {}
    for col, idx in plan.sources.items():
        for i in idx:
            v = row[i]
            if v is not None:
                main[col] = _value(v, plan.types[i])
                break
    yield from _inputs_of_main(plan, str(event_id), user_id, t_us, main)


def _inputs_of_main(plan: _ReadPlan, event_id: str, user_id: Any, t_us: int,
                    main: dict) -> Iterator[AggregateInput]:
    for name, key_col, cols in plan.aggs:
        key = user_id if key_col is None else main.get(key_col)
        if key is None or isinstance(key, (list, dict)):
            continue  # the stream skips these too (counter aggregate_key_missing)
        yield AggregateInput(partner=plan.partner, aggregate=name, key=str(key), event_id=event_id,
                             event_time_us=t_us, values=orjson.dumps({c: main.get(c) for c in cols}))


def _inputs_of_dead_row(plan: _ReadPlan, payload: Any) -> Iterator[AggregateInput]:
    """A main-table row the sink rejected: its dead-letter payload is the row JSON the stream saw."""
    try:
        main = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return
    if not isinstance(main, dict) or not isinstance(main.get("_event_time"), str) or main.get("_event_id") is None:
        return
    try:
        et = datetime.fromisoformat(main["_event_time"].replace("Z", "+00:00"))
    except ValueError:
        return
    yield from _inputs_of_main(plan, str(main["_event_id"]), main.get("_user_id"), _us(et), main)


def _late_coords(rows: Iterable[Sequence[Any]]) -> set[str]:
    return {r[0] for r in rows if r[0]}


def _order(inp: AggregateInput) -> tuple[int, str]:
    return inp.event_time_us, inp.event_id


# ------------------------------------------------------------------------------------- public


def aggregate_inputs_from_warehouse(contract: _Contract, partner: Optional[str] = None,
                                    since_us: Optional[int] = None, *, exclude_late: bool = True,
                                    include_rejected: bool = True) -> Iterator[AggregateInput]:
    """Every :class:`AggregateInput` the stream fed its aggregates, rebuilt from the warehouse rows.

    ``partner``: only that partner; ``since_us``: only rows with ``_event_time >= since_us``.
    Per partner, inputs come in (event time, event id) order. See the module docstring for
    typing, variants, rejected rows and late events.
    """
    wh = contract.warehouse
    reader: _Reader = _DuckReader(wh) if wh.kind == "duckdb" else _BigQueryReader(wh)
    try:
        for p in _partners(contract, partner):
            if not p.aggregates:
                continue
            schema = reader.schema(p.table.name)
            if schema is None:
                continue  # no row was ever written
            plan = _read_plan(p, schema)
            late = reader.late_coords(p.name) if exclude_late else set()
            rows = (inp for row in reader.rows(plan, since_us) for inp in _inputs_of_row(plan, row))
            if include_rejected:
                rejected = sorted((inp for payload in reader.rejected_payloads(plan, since_us)
                                   for inp in _inputs_of_dead_row(plan, payload)), key=_order)
                rows = heapq.merge(rows, rejected, key=_order)
            for inp in rows:
                if late and f"{inp.aggregate}:{inp.key}#{inp.event_id}" in late:
                    continue
                yield inp
    finally:
        reader.close()


def latest_aggregate_rows(contract: _Contract, partner: Optional[str] = None) -> dict[WindowKey, LatestAggregate]:
    """The latest row (highest version) per (partner, aggregate, key, window): README, "Aggregates"."""
    wh = contract.warehouse
    names = [p.name for p in _partners(contract, partner)]
    reader: _Reader = _DuckReader(wh) if wh.kind == "duckdb" else _BigQueryReader(wh)
    try:
        out: dict[WindowKey, LatestAggregate] = {}
        for r in reader.latest(names):
            p, a, k, w, metrics, wm, version, emitted, final = r
            if isinstance(metrics, (str, bytes)):
                metrics = orjson.loads(metrics)
            out[(p, a, k, w)] = LatestAggregate(metrics, int(version), _us(wm),
                                                None if emitted is None else _us(emitted), bool(final))
        return out
    finally:
        reader.close()


def latest_aggregates(contract: _Contract, partner: Optional[str] = None) -> dict[WindowKey, tuple[dict, int]]:
    """``{(partner, aggregate, key, window): (metrics, version)}`` of the latest aggregate rows."""
    return {k: (v.metrics, v.version) for k, v in latest_aggregate_rows(contract, partner).items()}


# ------------------------------------------------------------------------------------- backends


class _Reader(Protocol):
    def schema(self, table: str) -> Optional[TableSchema]: ...
    def rows(self, plan: _ReadPlan, since_us: Optional[int]) -> Iterator[Sequence[Any]]: ...
    def rejected_payloads(self, plan: _ReadPlan, since_us: Optional[int]) -> Iterator[Any]: ...
    def late_coords(self, partner: str) -> set[str]: ...
    def latest(self, partners: list[str]) -> Iterator[Sequence[Any]]: ...
    def close(self) -> None: ...


def _dq(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ts_param(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).replace(
        microsecond=us % 1_000_000, tzinfo=None)


class _DuckReader:
    """The DuckDB file, opened read-only (waits while a writer holds the file lock)."""

    def __init__(self, wh: WarehouseSpec):
        import os

        from sinks.duckdb_store import open_readonly

        if not os.path.exists(wh.path):
            raise WarehouseReadError(f"warehouse.path: DuckDB file {wh.path!r} does not exist")
        self.wh = wh
        self.con = open_readonly(wh.path)
        self._tables = {r[0] for r in self.con.execute(
            "SELECT table_name FROM information_schema.tables").fetchall()}

    def close(self) -> None:
        self.con.close()

    def schema(self, table: str) -> Optional[TableSchema]:
        if table not in self._tables or "_headwater_schemas" not in self._tables:
            return None
        row = self.con.execute("SELECT schema_json FROM _headwater_schemas WHERE table_name = ? "
                               "ORDER BY version DESC LIMIT 1", [table]).fetchone()
        return TableSchema.from_json(row[0]) if row else None

    def _pages(self, sql: str, params: list) -> Iterator[Sequence[Any]]:
        cur = self.con.cursor()
        try:
            cur.execute(sql, params)
            while True:
                page = cur.fetchmany(_PAGE)
                if not page:
                    return
                yield from page
        finally:
            cur.close()

    def rows(self, plan: _ReadPlan, since_us: Optional[int]) -> Iterator[Sequence[Any]]:
        where, params = ("WHERE _event_time >= ?", [_ts_param(since_us)]) if since_us is not None else ("", [])
        yield from self._pages(f"SELECT {', '.join(_dq(c) for c in plan.select)} FROM {_dq(plan.table)} {where} "
                               f"ORDER BY _event_time, _event_id", params)

    def rejected_payloads(self, plan: _ReadPlan, since_us: Optional[int]) -> Iterator[Any]:
        dl = self.wh.dead_letter_table
        if dl not in self._tables:
            return
        since = "AND event_time >= ?" if since_us is not None else ""
        params: list = [plan.partner, f"table:{plan.table}/%"] + ([_ts_param(since_us)] if since_us is not None else [])
        for (payload,) in self.con.execute(
                f"SELECT d.payload FROM {_dq(dl)} d WHERE d.partner = ? AND d.source = 'warehouse' "
                f"AND d.coords LIKE ? {since} AND NOT EXISTS (SELECT 1 FROM {_dq(plan.table)} t "
                f"WHERE t._row_id = substr(d.coords, {len(f'table:{plan.table}/') + 1}))", params).fetchall():
            yield bytes(payload) if payload is not None else None

    def late_coords(self, partner: str) -> set[str]:
        dl = self.wh.dead_letter_table
        if dl not in self._tables:
            return set()
        return _late_coords(self.con.execute(
            f"SELECT coords FROM {_dq(dl)} WHERE partner = ? AND source = 'aggregate' AND reason = 'late'",
            [partner]).fetchall())

    def latest(self, partners: list[str]) -> Iterator[Sequence[Any]]:
        ag = self.wh.aggregates_table
        if ag not in self._tables:
            return iter(())
        return self._pages(
            f"SELECT partner, aggregate, key, \"window\", metrics, watermark, version, emitted_at, final "
            f"FROM {_dq(ag)} WHERE partner IN (SELECT unnest(?)) "
            f"QUALIFY row_number() OVER (PARTITION BY partner, aggregate, key, \"window\" ORDER BY version DESC) = 1",
            [partners])


class _BigQueryReader:
    """BigQuery (or the emulator at ``warehouse.endpoint``): standard SQL queries, results paged."""

    def __init__(self, wh: WarehouseSpec):
        from sinks.bq_client import make_client

        self.wh = wh
        self.client = make_client(wh)
        self.timeout = wh.bigquery.request_timeout_s

    def close(self) -> None:
        self.client.close()

    def _ref(self, table: str) -> str:
        return f"`{self.wh.project}.{self.wh.dataset}.{table}`"

    def schema(self, table: str) -> Optional[TableSchema]:
        from google.api_core import exceptions as gexc

        from sinks.bq_rows import from_bigquery_fields

        try:
            t = self.client.get_table(f"{self.wh.project}.{self.wh.dataset}.{table}", timeout=self.timeout)
        except gexc.NotFound:
            return None
        except Exception as exc:  # noqa: BLE001 - unreachable endpoint, auth: one clear message
            raise WarehouseReadError(f"bigquery {self.wh.project}.{self.wh.dataset}: cannot read table {table!r}: "
                                     f"{type(exc).__name__}: {str(exc)[:300]}") from None
        return from_bigquery_fields(f.to_api_repr() for f in t.schema)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Sequence[Any]]:
        from google.cloud import bigquery

        cfg = bigquery.QueryJobConfig(query_parameters=list(params))
        job = self.client.query(sql, job_config=cfg, timeout=self.timeout)
        for row in job.result(page_size=_PAGE, timeout=self.timeout):
            yield tuple(row.values())

    def rows(self, plan: _ReadPlan, since_us: Optional[int]) -> Iterator[Sequence[Any]]:
        from google.cloud import bigquery

        params = []
        where = ""
        if since_us is not None:
            where = "WHERE _event_time >= @since"
            params.append(bigquery.ScalarQueryParameter("since", "TIMESTAMP", _ts_param(since_us)))
        cols = ", ".join(f"`{c}`" for c in plan.select)
        # Streaming inserts deduplicate on the row id only best-effort: one row per event, as in the stream.
        yield from self._query(
            f"SELECT {cols} FROM (SELECT {cols}, ROW_NUMBER() OVER (PARTITION BY _row_id) AS _n "
            f"FROM {self._ref(plan.table)} {where}) WHERE _n = 1 ORDER BY _event_time, _event_id", params)

    def _has(self, table: str) -> bool:
        return self.schema(table) is not None

    def rejected_payloads(self, plan: _ReadPlan, since_us: Optional[int]) -> Iterator[Any]:
        from google.cloud import bigquery

        dl = self.wh.dead_letter_table
        if not self._has(dl):
            return
        prefix = f"bigquery:{plan.table}/"
        params = [bigquery.ScalarQueryParameter("partner", "STRING", plan.partner),
                  bigquery.ScalarQueryParameter("prefix", "STRING", prefix)]
        since = ""
        if since_us is not None:
            since = "AND event_time >= @since"
            params.append(bigquery.ScalarQueryParameter("since", "TIMESTAMP", _ts_param(since_us)))
        for (payload, truncated, coords) in self._query(
                f"SELECT payload, payload_truncated, coords FROM {self._ref(dl)} WHERE partner = @partner "
                f"AND source = 'warehouse' AND STARTS_WITH(coords, @prefix) {since}", params):
            if truncated or payload is None:
                continue  # the row is not recoverable from the dead letter
            row_id = coords[len(prefix):]
            exists = list(self._query(
                f"SELECT 1 FROM {self._ref(plan.table)} WHERE _row_id = @id LIMIT 1",
                [bigquery.ScalarQueryParameter("id", "STRING", row_id)]))
            if not exists:
                yield payload

    def late_coords(self, partner: str) -> set[str]:
        from google.cloud import bigquery

        dl = self.wh.dead_letter_table
        if not self._has(dl):
            return set()
        return _late_coords(self._query(
            f"SELECT coords FROM {self._ref(dl)} WHERE partner = @partner AND source = 'aggregate' "
            f"AND reason = 'late'", [bigquery.ScalarQueryParameter("partner", "STRING", partner)]))

    def latest(self, partners: list[str]) -> Iterator[Sequence[Any]]:
        from google.cloud import bigquery

        ag = self.wh.aggregates_table
        if not self._has(ag):
            return iter(())
        return self._query(
            f"SELECT partner, aggregate, key, `window`, metrics, watermark, version, emitted_at, final FROM ("
            f"SELECT *, ROW_NUMBER() OVER (PARTITION BY partner, aggregate, key, `window` ORDER BY version DESC) "
            f"AS _n FROM {self._ref(ag)} WHERE partner IN UNNEST(@partners)) WHERE _n = 1",
            [bigquery.ArrayQueryParameter("partners", "STRING", partners)])
