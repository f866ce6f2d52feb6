"""BigQuery table operations for the sink: create, evolve, insertAll, load jobs. No Beam.

One code path for Dataflow and local tests: the only difference is the
client's endpoint (``WarehouseSpec.endpoint``), see :func:`make_client` and
docs/bigquery.md. Retries are explicit and bounded (the google-cloud-bigquery
default retry would wait up to 10 minutes on a row the emulator answers with
HTTP 500); terminal failures are returned as :class:`Rejection` values, never
raised, so the caller turns them into dead letters.

Isolation: when a request fails as a whole (a 400 on the request, or transient
errors past the bound) the batch is split in halves and each half retried, down
to single rows. So one bad row costs O(log n) extra requests and every other
row of its batch is still written. BigQuery's own per-row insertAll errors
(reason ``invalid``) need no splitting.
"""
from __future__ import annotations

import io
import logging
import random
import time
from typing import Callable, NamedTuple, Optional, Sequence, TypeVar

import orjson
import requests.exceptions
from google.api_core import exceptions as gexc
from google.cloud import bigquery

from flatten.schema import TableSchema
from sinks.bq_rows import TableLayout, from_bigquery_fields, is_terminal_reason, load_job_id, merge_schema
from sinks.spec import WarehouseSpec

__all__ = ["make_client", "Rejection", "BigQueryTables", "TRANSIENT_EXCEPTIONS"]

_LOG = logging.getLogger(__name__)
T = TypeVar("T")

# 5xx, 429, timeouts and dropped connections: worth retrying. BigQuery also signals quota with 403
# reason rateLimitExceeded / quotaExceeded, handled in _transient().
# ChunkedEncodingError: the connection was reset mid-response (the request may have been served).
TRANSIENT_EXCEPTIONS = (gexc.ServerError, gexc.TooManyRequests, gexc.RetryError, gexc.DeadlineExceeded,
                        requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        requests.exceptions.ChunkedEncodingError, ConnectionError, TimeoutError)
_INSERT_MAX_BYTES = 9 * 1024 * 1024  # insertAll request limit is 10 MB
_ROW_MAX_BYTES = {"streaming_inserts": 10 * 1024 * 1024, "file_loads": 100 * 1024 * 1024}


def make_client(wh: WarehouseSpec) -> bigquery.Client:
    """The google-cloud-bigquery client for ``wh``.

    Production (``endpoint`` unset): Application Default Credentials, the public endpoint.
    ``endpoint`` set: that API root, e.g. ``http://127.0.0.1:9050`` for bqemulator; a plain
    ``http://`` endpoint gets anonymous credentials (no token is ever sent in clear text,
    and none is needed locally), an ``https://`` one (regional / Private Service Connect)
    keeps ADC.
    """
    from google.api_core.client_options import ClientOptions

    if not wh.endpoint:
        return bigquery.Client(project=wh.project)
    creds = None
    if wh.endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        creds = AnonymousCredentials()
    return bigquery.Client(project=wh.project, credentials=creds,
                           client_options=ClientOptions(api_endpoint=wh.endpoint.rstrip("/")))


class Rejection(NamedTuple):
    """A record BigQuery will not take: ``key`` is the record's row id."""

    key: str
    error_class: str
    message: str
    too_large: bool = False


class _Exhausted(Exception):
    def __init__(self, last: BaseException, attempts: int):
        super().__init__(f"{type(last).__name__} after {attempts} attempts: {str(last)[:500]}")
        self.last = last


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_EXCEPTIONS):
        return True
    if isinstance(exc, gexc.Forbidden):
        return any((e or {}).get("reason") in ("rateLimitExceeded", "quotaExceeded") for e in (exc.errors or []))
    return False


class BigQueryTables:
    """Tables of one dataset, with a per-instance schema cache (one instance per DoFn)."""

    def __init__(self, wh: WarehouseSpec, client: Optional[bigquery.Client] = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.wh = wh
        self.opts = wh.bigquery
        self.client = client or make_client(wh)
        self._sleep = sleep
        self._schemas: dict[str, TableSchema] = {}
        self._clustering: dict[str, tuple[str, ...]] = {}
        self.retries = 0  # transient failures retried (for counters)
        self._dataset_ok = False

    # -- retry ------------------------------------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        delay = self.opts.initial_backoff_s
        for attempt in range(1, self.opts.max_attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 -- classified right here; non-transient re-raised
                if not _transient(exc):
                    raise
                if attempt == self.opts.max_attempts:
                    raise _Exhausted(exc, attempt) from exc
                self.retries += 1
                wait = min(delay, self.opts.max_backoff_s) * random.uniform(0.5, 1.5)
                _LOG.warning("bigquery %s: transient %s (attempt %d/%d), retrying in %.2fs",
                             what, type(exc).__name__, attempt, self.opts.max_attempts, wait)
                self._sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")

    def _ref(self, table: str) -> str:
        return f"{self.wh.project}.{self.wh.dataset}.{table}"

    # -- tables -----------------------------------------------------------------------------------
    def ensure_dataset(self) -> None:
        """Create the dataset if it does not exist (checked once per instance, before any table call:
        bqemulator answers a table call in a missing dataset with HTTP 500, not 404)."""
        if self._dataset_ok:
            return
        ref = f"{self.wh.project}.{self.wh.dataset}"
        try:
            self._retry("get dataset", lambda: self.client.get_dataset(ref, retry=None, timeout=self.opts.request_timeout_s))
        except gexc.NotFound:
            self._retry("create dataset", lambda: self.client.create_dataset(
                bigquery.Dataset(ref), exists_ok=True, retry=None, timeout=self.opts.request_timeout_s))
        self._dataset_ok = True

    def _get(self, table: str) -> bigquery.Table:
        return self._retry("get table", lambda: self.client.get_table(
            self._ref(table), retry=None, timeout=self.opts.request_timeout_s))

    def _remember(self, table: str, t: bigquery.Table) -> TableSchema:
        schema = from_bigquery_fields(f.to_api_repr() for f in t.schema)
        self._schemas[table] = schema
        self._clustering[table] = tuple(t.clustering_fields or ())
        return schema

    def schema_of(self, layout: TableLayout) -> Optional[TableSchema]:
        """The live schema of ``layout.table`` (cached per instance), or None if the table does not exist."""
        s = self._schemas.get(layout.table)
        if s is not None:
            return s
        self.ensure_dataset()
        try:
            return self._remember(layout.table, self._get(layout.table))
        except gexc.NotFound:
            return None

    def provide(self, layout: TableLayout, wanted: TableSchema) -> TableSchema:
        """Make ``layout.table`` exist with at least the columns of ``wanted``, *before* rows need them.

        First use: the table is created with ``wanted`` (all columns of the first batch), time
        partitioning and clustering, in one call. Later: each missing column is added with
        ``ALTER TABLE ... ADD COLUMN IF NOT EXISTS`` (NULLABLE, or ARRAY for REPEATED), which is
        idempotent when several workers race. Schema changes after the first batch are rare (a
        new attribute), so one DDL per column stays within BigQuery's table-update rate limit.
        """
        live = self.schema_of(layout)
        if live is None:
            return self._create(layout, wanted)
        merged = merge_schema(live, wanted)
        if merged is live and self._clustering.get(layout.table, ()) == layout.clustering_for(live):
            return live
        for c in merged.columns:
            if c.name not in live:
                self._ddl(f"ALTER TABLE `{self._ref(layout.table)}` ADD COLUMN IF NOT EXISTS {_ddl_column(c)}")
        return self._check_metadata(layout, wanted)

    def _ddl(self, sql: str) -> None:
        def run() -> None:
            job = self.client.query(sql, job_id_prefix="headwater_ddl_", retry=None, job_retry=None,
                                    timeout=self.opts.request_timeout_s)
            job.result(timeout=self.opts.request_timeout_s, retry=None, job_retry=None)

        self._retry("alter table", run)

    def _check_metadata(self, layout: TableLayout, wanted: TableSchema) -> TableSchema:
        """Re-read the table after DDL; patch what its metadata still lacks (columns, clustering).

        On BigQuery the DDL already updated the metadata, so this is one GET. bqemulator's DDL
        alters its storage but not its catalog (and its tables.patch the reverse), so there the
        patch runs too. The patch is conditional on the etag; on 412 it re-reads and retries.
        """
        for _ in range(self.opts.max_attempts):
            t = self._get(layout.table)
            live = from_bigquery_fields(f.to_api_repr() for f in t.schema)
            merged = merge_schema(live, wanted)
            fields = []
            if merged is not live:
                t.schema = _fields(merged)
                fields.append("schema")
            cl = layout.clustering_for(merged)
            if cl and tuple(t.clustering_fields or ()) != cl:
                t.clustering_fields = list(cl)  # a clustering column that exists only now
                fields.append("clustering_fields")
            if not fields:
                return self._remember(layout.table, t)
            try:
                t = self._retry("update table", lambda: self.client.update_table(
                    t, fields, retry=None, timeout=self.opts.request_timeout_s))
                return self._remember(layout.table, t)
            except gexc.PreconditionFailed:
                continue  # another writer changed the table in between: re-read and merge again
        raise RuntimeError(f"table {layout.table}: schema update kept conflicting with other writers")

    def _create(self, layout: TableLayout, schema: TableSchema) -> TableSchema:
        t = bigquery.Table(self._ref(layout.table), schema=_fields(schema))
        t.time_partitioning = bigquery.TimePartitioning(type_=layout.partition_type, field=layout.partition_field)
        cl = layout.clustering_for(schema)
        if cl:
            t.clustering_fields = list(cl)
        try:
            t = self._retry("create table", lambda: self.client.create_table(
                t, retry=None, timeout=self.opts.request_timeout_s))
        except gexc.Conflict:  # another worker created it first, maybe with fewer columns
            self._remember(layout.table, self._get(layout.table))
            return self.provide(layout, schema)
        return self._remember(layout.table, t)

    # -- writes -----------------------------------------------------------------------------------
    def write(self, layout: TableLayout, schema: TableSchema, records: Sequence[tuple[str, dict]],
              method: str) -> list[Rejection]:
        """Write ``records`` ([(row id, row)]) with ``method``; returns the rows BigQuery rejected."""
        rejections: list[Rejection] = []
        limit = _ROW_MAX_BYTES[method]
        encoded: list[tuple[str, dict, bytes]] = []
        for rid, rec in records:
            data = orjson.dumps(rec)
            if len(data) > limit:
                rejections.append(Rejection(rid, "RowTooLarge", f"table {layout.table}: row is {len(data)} bytes, "
                                            f"over BigQuery's {limit} byte limit for {method}", True))
            else:
                encoded.append((rid, rec, data))
        if method == "streaming_inserts":
            for chunk in _chunks(encoded, self.opts.insert_batch_rows, _INSERT_MAX_BYTES):
                rejections += self._isolate(layout, chunk, self._insert)
        else:
            for chunk in _chunks(encoded, self.opts.load_batch_rows, 1 << 62):
                rejections += self._isolate(layout, chunk, lambda lay, c: self._load(lay, schema, c))
        return rejections

    def _isolate(self, layout: TableLayout, batch: list, send: Callable) -> list[Rejection]:
        """Send ``batch``; when the request fails as a whole, bisect down to the bad rows."""
        out: list[Rejection] = []
        stack = [batch]
        while stack:
            part = stack.pop()
            try:
                out += send(layout, part)
                continue
            except _Exhausted as exc:
                err, msg = type(exc.last).__name__, f"transient errors past the retry bound: {exc}"
            except (gexc.BadRequest, gexc.RequestRangeNotSatisfiable, gexc.Forbidden) as exc:
                err, msg = type(exc).__name__, str(exc)[:2000]
            if len(part) == 1:
                out.append(Rejection(part[0][0], err, f"table {layout.table}: {msg}"))
            else:
                mid = len(part) // 2
                stack += [part[mid:], part[:mid]]
        return out

    def _insert(self, layout: TableLayout, batch: list) -> list[Rejection]:
        """insertAll with row ids = the rows' deterministic ids (BigQuery's best-effort dedup)."""
        out: list[Rejection] = []
        pending = batch
        delay = self.opts.initial_backoff_s
        transient_rounds = 0
        while pending:
            errors = self._retry("insertAll", lambda: self.client.insert_rows_json(
                self._ref(layout.table), [rec for _, rec, _ in pending], row_ids=[rid for rid, _, _ in pending],
                skip_invalid_rows=False, ignore_unknown_values=False, retry=None,
                timeout=self.opts.request_timeout_s))
            if not errors:
                break
            retry_next: list = []
            transient_rows = False
            for e in errors:
                rid, rec, data = pending[e["index"]]
                reasons = [x.get("reason") for x in e.get("errors") or []]
                terminal = [x for x in e.get("errors") or [] if is_terminal_reason(x.get("reason"))]
                if terminal:
                    msg = "; ".join(f"{x.get('reason')}: {x.get('message')} (at {x.get('location')})" for x in terminal)
                    out.append(Rejection(rid, "BigQueryInsertError", f"table {layout.table}: {msg}"[:4000]))
                elif all(r == "stopped" for r in reasons):
                    retry_next.append((rid, rec, data))  # valid row held back by an invalid one: resend now
                else:
                    transient_rows = True
                    retry_next.append((rid, rec, data))
            if transient_rows:
                transient_rounds += 1
                if transient_rounds >= self.opts.max_attempts:
                    raise _Exhausted(RuntimeError(f"per-row errors {errors[:3]}"), transient_rounds)
                self._sleep(min(delay, self.opts.max_backoff_s))
                delay *= 2
            pending = retry_next
        return out

    def _load(self, layout: TableLayout, schema: TableSchema, batch: list) -> list[Rejection]:
        """One load job (resumable upload of NDJSON from memory) with a deterministic job id."""
        data = b"\n".join(d for _, _, d in batch) + b"\n"
        rids = [rid for rid, _, _ in batch]
        cfg = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON, schema=_fields(schema),
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
            create_disposition=bigquery.CreateDisposition.CREATE_NEVER,
            schema_update_options=[bigquery.SchemaUpdateOption.ALLOW_FIELD_ADDITION])
        attempt = 0  # bumped only when a job with the current id failed: the id names one load attempt
        tries = 0
        last: Optional[BaseException] = None
        for _ in range(self.opts.max_attempts):
            job_id = load_job_id(layout.table, rids, attempt)
            try:
                # size=None -> resumable upload (bqemulator rejects load_table_from_json's multipart form).
                # num_retries=0: the retries are this loop's (bounded, counted), not the upload library's.
                job = self.client.load_table_from_file(
                    io.BytesIO(data), self._ref(layout.table), job_id=job_id, job_config=cfg, num_retries=0,
                    timeout=self.opts.request_timeout_s)
                job.result(timeout=self.opts.request_timeout_s, retry=None)
                return []
            except gexc.Conflict:
                job = self.client.get_job(job_id, retry=None, timeout=self.opts.request_timeout_s)
                if job.state == "DONE" and not job.error_result:
                    return []  # a replayed bundle: this exact batch was loaded already
                if job.state != "DONE":
                    job.result(timeout=self.opts.request_timeout_s, retry=None)
                    return []
                attempt += 1  # that attempt failed: the next one gets a fresh id
                last = RuntimeError(str(job.error_result))
                if not _transient_result(job.error_result):
                    raise gexc.BadRequest(f"load job {job_id} failed: {job.error_result}") from None
            except Exception as exc:  # noqa: BLE001 -- classified: transient retried, others re-raised
                if not _transient(exc):
                    raise
                last = exc
                tries += 1
                self.retries += 1
                self._sleep(min(self.opts.initial_backoff_s * 2 ** (tries - 1), self.opts.max_backoff_s))
                # Same job id next time: if this request reached BigQuery (a connection reset mid-response),
                # the retry gets a Conflict and the existing job's outcome decides (above): never a second load.
        raise _Exhausted(last or RuntimeError("load failed"), self.opts.max_attempts)


def _transient_result(err: Optional[dict]) -> bool:
    return bool(err) and err.get("reason") in ("backendError", "internalError", "rateLimitExceeded", "timeout")


def _ddl_column(c) -> str:
    t = f"ARRAY<{c.type}>" if c.mode == "REPEATED" else c.type
    return "`" + c.name.replace("`", "") + "` " + t


def _fields(schema: TableSchema) -> list[bigquery.SchemaField]:
    return [bigquery.SchemaField(c.name, c.type, mode=c.mode) for c in schema.columns]


def _chunks(items: list, max_rows: int, max_bytes: int):
    chunk: list = []
    size = 0
    for it in items:
        n = len(it[2]) + 64
        if chunk and (len(chunk) >= max_rows or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(it)
        size += n
    if chunk:
        yield chunk
