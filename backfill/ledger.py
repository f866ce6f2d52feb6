"""The backfill ledger: table ``_headwater_backfills`` in the target warehouse. No Beam.

One table, append-only, several kinds of rows per backfill id:

============  ================================================================================
``params``    what the backfill was asked (mode, range, sources, staging): a rerun of the same
              id with other arguments is refused
``chunk``     one per chunk staged: URI, generation (GCS generation / S3 ETag / local mtime-size)
``wave``      one per Beam run: the reconciliation counts of the chunks it read
``apply``     the staged rows were applied to the live tables (counts in ``detail``)
============  ================================================================================

A chunk row is written only after its wave's Beam run finished, i.e. after every row of the
chunk is in staging; staging writes are idempotent on ``_row_id``, so a crash between the
two only means the chunk is read again. Appending (never updating) keeps the BigQuery ledger
free of DML-on-streaming-buffer limits and makes every write idempotent to repeat.
"""
from __future__ import annotations

import time
from typing import Iterable, NamedTuple, Optional, Sequence

import orjson

from backfill.chunks import Chunk

__all__ = ["Counts", "summary_line", "LEDGER_TABLE", "LEDGER_COLUMNS", "LedgerRow", "DuckDBLedger", "BigQueryLedger"]

LEDGER_TABLE = "_headwater_backfills"
LEDGER_COLUMNS = (("backfill_id", "STRING"), ("kind", "STRING"), ("uri", "STRING"), ("generation", "STRING"),
                  ("wave", "INT64"), ("status", "STRING"), ("events_in", "INT64"), ("rows_out", "INT64"),
                  ("dead_letters", "INT64"), ("duplicates", "INT64"), ("out_of_range", "INT64"),
                  ("detail", "STRING"), ("started_at", "TIMESTAMP"), ("finished_at", "TIMESTAMP"))
_NAMES = [n for n, _ in LEDGER_COLUMNS]


class Counts(NamedTuple):
    """Reconciliation figures of one wave (or a whole run): in = rows + dead letters + duplicates + out of range."""

    events_in: int = 0
    rows: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    out_of_range: int = 0

    def __add__(self, other: "Counts") -> "Counts":  # type: ignore[override]
        return Counts(*(a + b for a, b in zip(self, other)))

    @property
    def reconciled(self) -> bool:
        return self.events_in == self.rows + self.dead_letters + self.duplicates + self.out_of_range


def summary_line(c: Counts, extra: str = "") -> str:
    """``N records in = rows + dead letters + duplicates + out of range -> OK`` (or MISMATCH)."""
    ok = "OK" if c.reconciled else "MISMATCH"
    return (f"{c.events_in:,} records in = {c.rows:,} rows + {c.dead_letters:,} dead letters + "
            f"{c.duplicates:,} duplicates + {c.out_of_range:,} out of range{extra} -> {ok}")


class LedgerRow(NamedTuple):
    backfill_id: str
    kind: str
    uri: Optional[str] = None
    generation: Optional[str] = None
    wave: Optional[int] = None
    status: Optional[str] = None
    events_in: Optional[int] = None
    rows_out: Optional[int] = None
    dead_letters: Optional[int] = None
    duplicates: Optional[int] = None
    out_of_range: Optional[int] = None
    detail: Optional[str] = None
    started_at: Optional[int] = None  # us since epoch
    finished_at: Optional[int] = None


def _now_us() -> int:
    return int(time.time() * 1_000_000)


def wave_rows(bid: str, wave: int, chunks: Sequence[Chunk], counts: Counts, started_us: int) -> list[LedgerRow]:
    done = _now_us()
    rows = [LedgerRow(bid, "chunk", c.uri, c.generation, wave, "staged", started_at=started_us, finished_at=done)
            for c in chunks]
    rows.append(LedgerRow(bid, "wave", None, None, wave, "staged", *counts, detail=orjson.dumps(
        {"chunks": len(chunks), "bytes": sum(c.size for c in chunks)}).decode(), started_at=started_us,
        finished_at=done))
    return rows


class _Ledger:
    def _select(self, sql_where: str, params: list, what: str = "*") -> list[dict]:
        raise NotImplementedError

    def append(self, rows: Iterable[LedgerRow]) -> None:
        raise NotImplementedError

    def ensure(self) -> None:
        raise NotImplementedError

    # -- reads shared by both warehouses --------------------------------------------------------
    def params(self, bid: str) -> Optional[dict]:
        rows = self._select("backfill_id = ? AND kind = 'params'", [bid])
        return orjson.loads(rows[0]["detail"]) if rows else None

    def record_params(self, bid: str, detail: dict) -> None:
        self.append([LedgerRow(bid, "params", status="started", detail=orjson.dumps(detail).decode(),
                               started_at=_now_us())])

    def done(self, bid: str, chunks: Sequence[Chunk]) -> set[str]:
        """URIs of ``chunks`` already staged by ``bid`` with the same generation."""
        if not chunks:
            return set()
        uris = [c.uri for c in chunks]
        marks = ", ".join("?" for _ in uris)
        got = {(r["uri"], r["generation"]) for r in self._select(
            f"backfill_id = ? AND kind = 'chunk' AND uri IN ({marks})", [bid, *uris])}
        return {c.uri for c in chunks if (c.uri, c.generation) in got}

    def record_wave(self, bid: str, wave: int, chunks: Sequence[Chunk], counts: Counts, started_us: int) -> None:
        self.append(wave_rows(bid, wave, chunks, counts, started_us))

    def staged_totals(self, bid: str) -> tuple[int, Counts, int]:
        """(waves, summed counts, distinct chunks staged) recorded for ``bid``: aggregated in the warehouse,
        so 100,000 chunk rows are never fetched."""
        w = self._select("backfill_id = ? AND kind = 'wave'", [bid],
                         "COUNT(*) AS waves, MAX(wave) AS last, SUM(events_in) AS a, SUM(rows_out) AS b, "
                         "SUM(dead_letters) AS c, SUM(duplicates) AS d, SUM(out_of_range) AS e")[0]
        chunks = self._select("backfill_id = ? AND kind = 'chunk'", [bid], "COUNT(DISTINCT uri) AS n")[0]["n"]
        total = Counts(*(int(w[k] or 0) for k in "abcde"))
        return int(w["waves"] or 0), total, int(chunks or 0)

    def next_wave(self, bid: str) -> int:
        last = self._select("backfill_id = ? AND kind = 'wave'", [bid], "MAX(wave) AS last")[0]["last"]
        return 0 if last is None else int(last) + 1

    def applied(self, bid: str) -> Optional[dict]:
        rows = self._select("backfill_id = ? AND kind = 'apply'", [bid])
        return orjson.loads(rows[0]["detail"]) if rows else None


class DuckDBLedger(_Ledger):
    """The ledger inside the target DuckDB file. ``connect`` opens (and retries) a read-write connection."""

    def __init__(self, connect):
        self._connect = connect

    def ensure(self) -> None:
        con = self._connect()
        try:
            self.create(con)
        finally:
            con.close()

    @staticmethod
    def create(con) -> None:
        types = {"STRING": "VARCHAR", "INT64": "BIGINT", "TIMESTAMP": "TIMESTAMP"}
        cols = ", ".join(f'"{n}" {types[t]}' for n, t in LEDGER_COLUMNS)
        con.execute(f"CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} ({cols})")

    @staticmethod
    def insert(con, rows: Iterable[LedgerRow]) -> None:
        marks = ", ".join("make_timestamp(?)" if t == "TIMESTAMP" else "?" for _, t in LEDGER_COLUMNS)
        for r in rows:
            con.execute(f"INSERT INTO {LEDGER_TABLE} ({', '.join(_NAMES)}) VALUES ({marks})", list(r))

    def append(self, rows: Iterable[LedgerRow]) -> None:
        con = self._connect()
        try:
            con.execute("BEGIN TRANSACTION")
            self.insert(con, rows)
            con.execute("COMMIT")
        finally:
            con.close()

    def _select(self, where: str, params: list, what: str = "*") -> list[dict]:
        con = self._connect()
        try:
            order = " ORDER BY finished_at" if what == "*" else ""
            cur = con.execute(f"SELECT {what} FROM {LEDGER_TABLE} WHERE {where}{order}", params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
        finally:
            con.close()


class BigQueryLedger(_Ledger):
    """The ledger in the target BigQuery dataset, written with DML ``INSERT`` (query parameters, no streaming buffer)."""

    def __init__(self, client, project: str, dataset: str, timeout_s: float = 120.0):
        self._client = client
        self.ref = f"{project}.{dataset}.{LEDGER_TABLE}"
        self._timeout = timeout_s

    def _query(self, sql: str, params: Sequence = ()) -> list[dict]:
        from google.cloud import bigquery

        cfg = bigquery.QueryJobConfig(query_parameters=[_param(i, v) for i, v in enumerate(params)],
                                      labels={"headwater_step": "backfill_ledger"})
        job = self._client.query(sql, job_config=cfg, retry=None, job_retry=None, timeout=self._timeout)
        return [dict(r) for r in job.result(timeout=self._timeout, retry=None)]

    def ensure(self) -> None:
        cols = ", ".join(f"`{n}` {t}" for n, t in LEDGER_COLUMNS)
        self._query(f"CREATE TABLE IF NOT EXISTS `{self.ref}` ({cols})")

    def append(self, rows: Iterable[LedgerRow]) -> None:
        rows = list(rows)
        if not rows:
            return
        params: list = []
        values = []
        for r in rows:
            marks = []
            for (name, typ), v in zip(LEDGER_COLUMNS, r):
                params.append((typ, v))
                marks.append(f"TIMESTAMP_MICROS(@p{len(params) - 1})" if typ == "TIMESTAMP" else f"@p{len(params) - 1}")
            values.append("(" + ", ".join(marks) + ")")
        self._query(f"INSERT INTO `{self.ref}` ({', '.join(f'`{n}`' for n in _NAMES)}) VALUES {', '.join(values)}",
                    params)

    def _select(self, where: str, params: list, what: str = "*") -> list[dict]:
        n = iter(range(len(params)))
        where_bq = "".join(f"@p{next(n)}" if ch == "?" else ch for ch in where)
        order = " ORDER BY finished_at" if what == "*" else ""
        return self._query(f"SELECT {what} FROM `{self.ref}` WHERE {where_bq}{order}",
                           [(_guess(v), v) for v in params])


def _guess(v) -> str:
    return "INT64" if isinstance(v, int) else "STRING"


def _param(i: int, tv):
    from google.cloud import bigquery

    typ, v = tv
    return bigquery.ScalarQueryParameter(f"p{i}", "INT64" if typ == "TIMESTAMP" else typ, v)
