"""``headwater replay``: dead letters re-run through the current contract (after a fix), rows idempotent.

    read dead letters (partner, reason, recorded in [from, to), not yet turned into rows)
    payload: stored masked JSON -> as is; stored encrypted (``enc:v1:``) -> decrypted, parsed, masked here
    Beam run: Create -> the stream's steps with masking OFF (payloads are masked exactly once) -> staging
    apply as a ``fill`` (``_row_id`` absent only: replaying twice inserts nothing twice)
    marks: ``_headwater_replays`` (replay id, dead-letter id, result 'row' | 'dead_letter')

Masking exactly once: every payload entering the pipeline is already masked, so the replay
contract has no column annotations (a hash is never hashed again). Encrypted payloads were
never masked (they could not be parsed): they are decrypted with the masking key, parsed and
masked by the partner's ``Masker`` before the run; one that still does not parse is not
replayed (it would be stored again, and without annotations it would be stored in clear).

Marks are rows of their own table (append-only), not an UPDATE of the dead-letter table: on
BigQuery, dead letters written by streaming inserts cannot be updated while in the streaming
buffer. A dead letter is skipped by later replays once a mark says ``row``.
Not replayed: sink rejections and aggregate-only dead letters (their payload is a row, not an
event) and dead letters without payload (unreadable file, unknown partner, too large).
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from typing import Optional, Sequence, TextIO

import apache_beam as beam
import orjson

from backfill.ledger import Counts
from backfill.planner import make_target
from backfill.signals import Stopped, exit_code, stop_on_signals
from backfill.spec import BackfillSpec
from backfill.summary import CountOutcomes, LiveCount, counts_from, rows_include_duplicates, summary_line
from flatten.records import RawMessage
from ingest.contract import Contract, FileSource
from ingest.mask_key import contract_mask_key

__all__ = ["replay", "REPLAYS_TABLE"]

REPLAYS_TABLE = "_headwater_replays"
_SKIP_SOURCES = ("warehouse", "aggregate")


class _CountReplayedFn(beam.DoFn):
    def __init__(self):
        from apache_beam.metrics import Metrics

        self._n = Metrics.counter("headwater", "replay_records")

    def process(self, msg):
        self._n.inc()
        yield msg


def _read_duckdb(target, contract: Contract, partner: Optional[str], reason: Optional[str],
                 start_us: Optional[int], end_us: Optional[int]) -> list[dict]:
    import os

    if not os.path.exists(target.path):
        return []
    con = target.connect()
    try:
        _ensure_marks_duckdb(con)
        dl = '"' + contract.warehouse.dead_letter_table + '"'
        where, params = _filters(partner, reason, start_us, end_us, "make_timestamp(?)", "processing_time")
        rows = con.execute(
            f"SELECT id, partner, source, coords, payload, reason, epoch_us(processing_time) AS pt FROM {dl} "
            f"WHERE {where} AND id NOT IN (SELECT dead_letter_id FROM {REPLAYS_TABLE} WHERE result = 'row') "
            "ORDER BY id", params).fetchall()
        return [{"id": r[0], "partner": r[1], "source": r[2], "coords": r[3], "payload": bytes(r[4] or b""),
                 "reason": r[5], "pt": r[6]} for r in rows]
    finally:
        con.close()


def _ensure_marks_duckdb(con) -> None:
    con.execute(f"CREATE TABLE IF NOT EXISTS {REPLAYS_TABLE} (replay_id VARCHAR, dead_letter_id VARCHAR, "
                "partner VARCHAR, coords VARCHAR, result VARCHAR, replayed_at TIMESTAMP)")


def _filters(partner, reason, start_us, end_us, ts: str, col: str) -> tuple[str, list]:
    where = [f"source NOT IN {_SKIP_SOURCES!r}"]
    params: list = []
    for cond, value in (("partner = ?", partner), ("reason = ?", reason),
                        (f"{col} >= {ts}", start_us), (f"{col} < {ts}", end_us)):
        if value is not None:
            where.append(cond)
            params.append(value)
    return " AND ".join(where), params


def _read_bigquery(target, contract: Contract, partner, reason, start_us, end_us) -> list[dict]:
    from google.cloud import bigquery

    ref = f"{contract.warehouse.project}.{contract.warehouse.dataset}"
    target._query(f"CREATE TABLE IF NOT EXISTS `{ref}.{REPLAYS_TABLE}` (replay_id STRING, dead_letter_id STRING, "
                  "partner STRING, coords STRING, result STRING, replayed_at TIMESTAMP)", "replay")
    if contract.warehouse.dead_letter_table not in target._all_tables(contract.warehouse.dataset):
        return []
    where, params = _filters(partner, reason, start_us, end_us, "TIMESTAMP_MICROS(?)", "`timestamp`")
    n = iter(range(len(params)))
    where = "".join(f"@p{next(n)}" if ch == "?" else ch for ch in where)
    cfg = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter(f"p{i}", "INT64" if isinstance(v, int) else "STRING", v)
        for i, v in enumerate(params)])
    sql = (f"SELECT _row_id AS id, partner, source, coords, payload, reason, UNIX_MICROS(`timestamp`) AS pt "
           f"FROM `{ref}.{contract.warehouse.dead_letter_table}` WHERE {where} AND _row_id NOT IN "
           f"(SELECT dead_letter_id FROM `{ref}.{REPLAYS_TABLE}` WHERE result = 'row') ORDER BY id")
    rows = target.client.query(sql, job_config=cfg, retry=None, job_retry=None).result(retry=None)
    return [dict(r, payload=(r["payload"] or "").encode("utf-8")) for r in rows]


def _prepare(contract: Contract, dls: list[dict]) -> tuple[list[RawMessage], list[dict], int]:
    """RawMessages with masked payloads; the dead letters replayed; how many could not be (no/undecodable payload)."""
    from flatten.mask import ENC_PREFIX, Masker

    m = contract.masking
    key = None
    maskers: dict[str, Masker] = {}
    msgs, used, skipped = [], [], 0
    for d in dls:
        payload = d["payload"]
        if not payload or d["partner"] not in {p.name for p in contract.partners}:
            skipped += 1
            continue
        if payload.startswith(ENC_PREFIX):
            if key is None:
                key = contract_mask_key(m)
            p = contract.partner(d["partner"])
            masker = maskers.setdefault(p.name, Masker(p.columns, key))
            raw = masker.decrypt_unparsed(payload)
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                skipped += 1  # still unparseable: replaying would only store it again
                continue
            if not isinstance(doc, dict):
                skipped += 1
                continue
            payload = orjson.dumps(masker.mask_doc(doc))  # masked here, exactly once
        msgs.append(RawMessage(d["partner"], d["source"], d["coords"], payload, b"{}", int(d["pt"] or 0)))
        used.append(d)
    return msgs, used, skipped


def _replay_contract(contract: Contract, partners: list[str], staging) -> Contract:
    ps = []
    for name in partners:
        p = contract.partner(name)
        ps.append(p.model_copy(update={"sources": (FileSource(kind="file", pattern="headwater-replay"),),
                                       "columns": (), "aggregates": ()}))
    return contract.model_copy(update={"partners": tuple(ps), "warehouse": staging})


def replay(contract: Contract, partner: Optional[str] = None, reason: Optional[str] = None,
           start_us: Optional[int] = None, end_us: Optional[int] = None, replay_id: Optional[str] = None,
           beam_argv: Sequence[str] = (), out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Replay matching dead letters; returns the exit code (0 reconciled, 1 not)."""
    from ingest.objectstore import configure_gcs_emulator
    from ingest.pipeline import HeadwaterOutputs, HeadwaterPipeline, WriteWarehouse, _configure_local_state_cache, \
        pipeline_options

    if partner is not None:
        contract.partner(partner)  # ContractError naming the partner
    rid = replay_id or "replay_" + datetime.now(timezone.utc).strftime("%Y%m%dt%H%M%S")
    BackfillSpec(partner=partner or "x", patterns=("dead-letters",), backfill_id=rid)  # validates the id
    target = make_target(contract, rid)
    if hasattr(target, "ensure"):
        target.ensure()
    else:
        target.ledger.ensure()
    if target.kind == "bigquery":
        dls = _read_bigquery(target, contract, partner, reason, start_us, end_us)
    else:
        dls = _read_duckdb(target, contract, partner, reason, start_us, end_us)
    msgs, used, skipped = _prepare(contract, dls)
    out.write(f"replay {rid}: {len(dls):,} dead letters match, {len(msgs):,} replayable"
              f"{f', {skipped:,} not (no payload, or still unparseable)' if skipped else ''}\n")
    if not msgs:
        out.write(f"Reconciliation: {summary_line(Counts())}\n")
        return 0
    partners = sorted({m.partner for m in msgs})
    rc = _replay_contract(contract, partners, target.staging_warehouse)
    _configure_local_state_cache(beam_argv)
    configure_gcs_emulator()
    p = beam.Pipeline(options=pipeline_options(rc, beam_argv))
    overrides = {f"Read_{name}_file_0": (("DeadLetters" >> beam.Create([m for m in msgs if m.partner == name]))
                                         | "CountReplayed" >> beam.ParDo(_CountReplayedFn()))
                 for name in partners}
    o = p | "Headwater" >> HeadwaterPipeline(rc, source_overrides=overrides, require_overrides=True)
    _ = (o.rows, o.dead_letters) | "CountOutcomes" >> CountOutcomes([x.table.name for x in rc.partners])
    _ = HeadwaterOutputs(o.rows, o.aggregates, o.dead_letters) | "WriteWarehouse" >> WriteWarehouse(rc)
    t0 = time.monotonic()
    try:
        with stop_on_signals(), LiveCount(err, "dead letters replayed"):
            result = p.run()
            state = str(result.wait_until_finish())
    except Stopped as stop:
        out.write(f"replay {rid}: stopped by {stop.name} before the apply: nothing changed in the warehouse "
                  "(staging is dropped); rerun to replay\n")
        target.drop_staging()
        return exit_code(stop)
    counts = counts_from(result, rows_include_duplicates(rc))
    failed = _failed_again(target, contract)
    tables: dict = {}
    for name in partners:
        spec = BackfillSpec(partner=name, patterns=("dead-letters",), backfill_id=rid)
        tables.update(target.apply(spec, name, contract.partner(name).table)["tables"])
    _mark(target, contract, rid, used, failed)
    target.drop_staging()
    rows_in = sum(1 for d in used if d["coords"] not in failed)
    out.write(f"replay {rid}: job {state} in {time.monotonic() - t0:.1f}s; {rows_in:,} dead letters became rows, "
              f"{len(used) - rows_in:,} failed again (new dead letters); marks in {REPLAYS_TABLE}\n")
    for t, x in sorted(tables.items()):
        out.write(f"  {t:<40} inserted {x['inserted']:>9,} (already there: {x['staged'] - x['inserted']:,})\n")
    out.write(f"Reconciliation: {summary_line(counts)}\n")
    return 0 if state.endswith("DONE") and counts.reconciled else 1


def _failed_again(target, contract: Contract) -> set[str]:
    """Coords of the replayed messages that became dead letters again (read from staging)."""
    dl = contract.warehouse.dead_letter_table
    if target.kind == "bigquery":
        if dl not in target._all_tables(target.staging_name):
            return set()
        ref = f"{contract.warehouse.project}.{target.staging_name}.{dl}"
        return {r["coords"] for r in target._query(f"SELECT DISTINCT coords FROM `{ref}`", "replay")}
    import os

    if not os.path.exists(target.staging_name):
        return set()
    con = target.connect(target.staging_name, read_only=True)
    try:
        if not con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = ?", [dl]).fetchall():
            return set()
        return {r[0] for r in con.execute(f'SELECT DISTINCT coords FROM "{dl}"').fetchall()}
    finally:
        con.close()


def _mark(target, contract: Contract, rid: str, used: list[dict], failed: set[str]) -> None:
    now = int(time.time() * 1_000_000)
    marks = [(rid, d["id"], d["partner"], d["coords"], "dead_letter" if d["coords"] in failed else "row", now)
             for d in used]
    if target.kind == "bigquery":
        from google.cloud import bigquery

        ref = f"{contract.warehouse.project}.{contract.warehouse.dataset}.{REPLAYS_TABLE}"
        for i in range(0, len(marks), 500):
            part = marks[i:i + 500]
            params, values = [], []
            for m in part:
                base = len(params)
                params += [bigquery.ScalarQueryParameter(f"p{base + j}", "INT64" if j == 5 else "STRING", v)
                           for j, v in enumerate(m)]
                values.append(f"(@p{base}, @p{base + 1}, @p{base + 2}, @p{base + 3}, @p{base + 4}, "
                              f"TIMESTAMP_MICROS(@p{base + 5}))")
            target.client.query(f"INSERT INTO `{ref}` VALUES {', '.join(values)}",
                                job_config=bigquery.QueryJobConfig(query_parameters=params),
                                retry=None, job_retry=None).result(retry=None)
        return
    con = target.connect()
    try:
        _ensure_marks_duckdb(con)
        con.executemany(f"INSERT INTO {REPLAYS_TABLE} VALUES (?, ?, ?, ?, ?, make_timestamp(?))", marks)
    finally:
        con.close()
