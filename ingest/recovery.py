"""A local streaming job's start-up: aggregate state and dedup flags rebuilt from the warehouse.

Prism keeps state in memory only, so a restarted local job starts with none. What is durable is
the warehouse, and the sources commit only what the warehouse holds (``sinks.ledger``), so the
warehouse is the state to resume from:

* **Aggregate state**: every key's :class:`state.aggregate.AggState` is the fold of the warehouse
  rows' aggregate inputs with the stream's own pure functions (``state.recompute.fold_states``
  over ``sinks.warehouse_reader.aggregate_inputs_from_warehouse``). Its version continues above
  the key's highest version in the aggregates table. A key whose latest aggregate rows differ from
  the fold (the job died between writing an event's rows and emitting the aggregate) gets its
  rows written now, before the job starts, so the aggregates table agrees with the rows at once.
  The stateful DoFn takes a key's folded state on its first touch (:class:`AggregateSeed`).
* **Dedup flags**: the event ids of the live partners' rows (:class:`SeenIds`). Messages after
  the last committed offset / ack whose rows were already written are redelivered; they are
  dropped as duplicates (and committed), never counted twice. A seeded id counts as seen on its
  first touch; from then on the usual flag, expiring ``window`` after that arrival, takes over.

Both snapshots are files in a temporary directory handed to the DoFns by path (the LOOPBACK
workers run in this process and read them once per process; see :func:`_cached`).
Cost: one pass over the live partners' main tables at launch (the seed holds one id per row in
memory, and one state per aggregate key).
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from typing import Any, NamedTuple, Optional

from flatten.records import AggregateRow
from ingest import scratch

__all__ = ["Recovery", "SeenIds", "AggregateSeed", "prepare_recovery"]

_LOG = logging.getLogger(__name__)
_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()


def _cached(path: str) -> Any:
    """The unpickled snapshot at ``path``, loaded once per process (shared by every DoFn instance)."""
    with _CACHE_LOCK:
        if path not in _CACHE:
            with open(path, "rb") as fh:
                _CACHE[path] = pickle.load(fh)
        return _CACHE[path]


class SeenIds:
    """Picklable handle of the dedup seed: ``{dedup key}`` of the events already in the warehouse."""

    def __init__(self, path: str, window_s: float, count: int):
        self.path = path
        self.window_s = window_s
        self.count = count
        self._loaded_at: Optional[float] = None

    def load(self) -> None:
        _cached(self.path)
        if self._loaded_at is None:
            self._loaded_at = time.time()

    def take(self, key: str) -> bool:
        """True once for an id the warehouse held at launch (then forgotten: the DoFn's flag takes over)."""
        ids = _cached(self.path)
        if self._loaded_at is not None and time.time() > self._loaded_at + self.window_s:
            ids.clear()  # the dedup window since launch has passed: the seed has expired as a whole
            return False
        try:
            ids.remove(key)
            return True
        except KeyError:
            return False


class AggregateSeed:
    """Picklable handle of the aggregate seed: ``{(partner, aggregate, key): AggState bytes}``."""

    def __init__(self, path: str, count: int):
        self.path = path
        self.count = count

    def load(self) -> None:
        _cached(self.path)

    def take(self, key: tuple) -> Optional[bytes]:
        """The key's folded state, once (its first touch); None for keys the warehouse did not have."""
        return _cached(self.path).pop(tuple(key), None)


class Recovery(NamedTuple):
    seen: Optional[SeenIds]
    states: Optional[AggregateSeed]
    repaired: int  # aggregate rows written at launch (keys whose latest rows lagged their rows)


def _event_ids_duckdb(contract, partners: list) -> set[str]:
    from ingest.dedup import dedup_key
    from sinks.duckdb_store import open_readonly

    out: set[str] = set()
    if not os.path.exists(contract.warehouse.path):
        return out
    con = open_readonly(contract.warehouse.path)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        for p in partners:
            if p.table.name not in tables:
                continue
            cur = con.execute(f'SELECT DISTINCT "_event_id" FROM "{p.table.name}"')
            while True:
                page = cur.fetchmany(50_000)
                if not page:
                    break
                out.update(dedup_key(p.name, r[0]) for r in page if r[0] is not None)
    finally:
        con.close()
    return out


def _write(obj: Any, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _fold(contract, partners: list, emitted_us: int) -> tuple[dict, list[AggregateRow]]:
    """(seed states by key, aggregate rows to write now) from the warehouse rows."""
    import orjson

    from sinks.warehouse_reader import aggregate_inputs_from_warehouse, latest_aggregate_rows
    from state import aggregate as A
    from state.recompute import fold_states

    specs = {(p.name, a.name): a for p in partners for a in p.aggregates}
    if not specs:
        return {}, []
    names = {p.name for p in partners}
    inputs = (i for i in aggregate_inputs_from_warehouse(contract) if i.partner in names)
    states = fold_states(specs, inputs)
    latest = latest_aggregate_rows(contract)
    top: dict[tuple, int] = {}
    for (p, a, k, _w), row in latest.items():
        top[(p, a, k)] = max(top.get((p, a, k), 0), row.version)
    seed: dict[tuple, bytes] = {}
    repair: list[AggregateRow] = []
    for key, st in states.items():
        plan = A.plan_for(specs[(key[0], key[1])])
        st.version = max(st.version, top.get(key, 0))
        st.emit_pending = False
        st.dirty = True
        st, rows = A.emit(st, plan)  # every window's value as of the key's clock; versions above the table's
        stale = [r for r in rows if (got := latest.get((*key, r.window))) is None or got.metrics != r.metrics]
        for r in stale:
            repair.append(AggregateRow(partner=key[0], aggregate=key[1], key=key[2], window=r.window,
                                       metrics=orjson.dumps(r.metrics), watermark_us=r.watermark_us,
                                       version=r.version, emitted_us=emitted_us, final=r.final))
        seed[key] = st.to_bytes()
    return seed, repair


def remove_snapshots() -> None:
    """Remove this process's start-up snapshots (the job has ended: its workers read them at start-up)."""
    scratch.remove_mine("recovery")


def prepare_recovery(contract, dedup_window_s: float = 86_400.0) -> Recovery:
    """Build the start-up snapshots of a local streaming job (see the module docstring).

    Partners without a live source keep their state only for bounded jobs and are left out.
    The DuckDB warehouse is rebuilt from; for BigQuery the aggregate state is rebuilt too (the
    warehouse reader reads both) and the dedup seed reads the event ids through the same client.
    """
    live = [p for p in contract.partners if any(s.kind in ("kafka", "pubsub") for s in p.sources)]
    if not live or (contract.warehouse.kind == "duckdb" and not os.path.exists(contract.warehouse.path)):
        return Recovery(None, None, 0)  # nothing durable yet: a first start
    started = time.monotonic()
    folder = scratch.new_dir("recovery")  # removed when the job ends (remove_snapshots), or by the next start
    if contract.warehouse.kind == "duckdb":
        ids = _event_ids_duckdb(contract, live)
    else:
        ids = _event_ids_bigquery(contract, live)
    seen = SeenIds(_write(ids, folder, "seen_ids.pickle"), dedup_window_s, len(ids))
    seed, repair = _fold(contract, live, int(time.time() * 1_000_000))
    if repair:
        _write_aggregates(contract, repair)
    states = AggregateSeed(_write(seed, folder, "aggregate_states.pickle"), len(seed))
    if ids or seed:
        _LOG.warning("headwater: resuming from the warehouse: %d event ids seen, %d aggregate keys rebuilt, "
                     "%d aggregate rows brought up to date (%.1fs)", len(ids), len(seed), len(repair),
                     time.monotonic() - started)
    return Recovery(seen, states, len(repair))


def _write_aggregates(contract, rows: list[AggregateRow]) -> None:
    wh = contract.warehouse
    tables = {p.name: p.table for p in contract.partners}
    modes = {p.name: p.flatten.schema_mode for p in contract.partners}
    if wh.kind == "duckdb":
        from sinks.duckdb_store import DuckDBWarehouse

        DuckDBWarehouse(wh, tables, modes).write_aggregates(rows)
        return
    from sinks import bq_rows
    from sinks.bq_client import BigQueryTables

    bq = BigQueryTables(wh)
    layout = bq_rows.aggregates_layout(wh)
    schema = bq.provide(layout, layout.base)
    bq.write(layout, schema, [bq_rows.aggregate_record(a) for a in rows], "streaming_inserts")


def _event_ids_bigquery(contract, partners: list) -> set[str]:
    from google.api_core import exceptions as gexc

    from ingest.dedup import dedup_key
    from sinks.bq_client import make_client

    wh = contract.warehouse
    client = make_client(wh)
    out: set[str] = set()
    try:
        for p in partners:
            try:
                job = client.query(f"SELECT DISTINCT _event_id FROM `{wh.project}.{wh.dataset}.{p.table.name}`",
                                   timeout=wh.bigquery.request_timeout_s)
                for row in job.result(page_size=50_000, timeout=wh.bigquery.request_timeout_s):
                    if row[0] is not None:
                        out.add(dedup_key(p.name, row[0]))
            except gexc.NotFound:
                continue  # no row was ever written
    finally:
        client.close()
    return out
