"""`headwater flatten` and `headwater schema`: look at rows and schemas without running a pipeline."""
from __future__ import annotations

import secrets
import time
from typing import Optional, TextIO

import orjson

from flatten.core import FlattenError, Flattener
from flatten import jsonio
from flatten.mask import Masker
from flatten.options import FlattenOptions
from flatten.records import DeadLetter, RawMessage
from ingest.contract import Contract, EnvelopeSpec, load_contract
from ingest.envelope import EnvelopeParser
from ingest.mask_key import contract_mask_key

__all__ = ["preview", "show_schema"]


def _lines(path: str, max_bytes: int):
    """Raw lines of any file (gzip by extension), never decoded here: hostile bytes stay data.
    Lines longer than ``max_bytes`` come back as None (never held whole)."""
    import gzip

    from ingest.lines import split_lines

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for n, line, size in split_lines(fh, max_bytes):
            yield n, line, size


def preview(path: str, config: Optional[str], partner: Optional[str], limit: int, out: TextIO) -> int:
    """Print the rows each event of ``path`` becomes; bad lines are reported with their reason. Exit 0."""
    if config:
        contract = load_contract(config)
        p = contract.partner(partner) if partner else contract.partners[0]
        m = contract.masking
        masker = Masker(p.columns, contract_mask_key(m))  # key_secret, env var, file or dev key
        envelope, options, name, table = p.envelope, p.flatten, p.name, p.table.name
    else:
        masker = Masker((), secrets.token_bytes(32))  # no annotations: the key is never used
        envelope, options, name, table = EnvelopeSpec(), FlattenOptions(), "preview", "events"
    parser = EnvelopeParser(envelope, masker, step="Preview")
    flattener = Flattener(options)
    shown = bad = good = 0
    for n, line, size in _lines(path, envelope.max_payload_bytes):
        if line is None:
            bad += 1
            out.write(f"line {n}: DEAD LETTER too_large: line is {size} bytes, limit {envelope.max_payload_bytes}\n")
            continue
        if not line.strip():  # as the file source: a dead letter, never silently skipped
            bad += 1
            out.write(f"line {n}: DEAD LETTER empty_line: line {n} is empty\n")
            continue
        msg = RawMessage(name, "file", f"file:{path}:{n}", line, b"{}", 0)
        ev = parser.parse(msg, int(time.time() * 1e6))
        if isinstance(ev, DeadLetter) and not config and ev.reason in ("missing_user_id", "missing_event_id",
                                                                     "bad_event_time"):
            # Without a contract the envelope is unknown: preview the body with line-number ids.
            try:
                doc = jsonio.loads(line)
            except orjson.JSONDecodeError:
                doc = None
            if isinstance(doc, dict):
                ev = None
                rows = _flat(flattener, doc, f"line-{n}", "", 0)
            else:
                rows = None
        elif isinstance(ev, DeadLetter):
            rows = None
        else:
            rows = _flat(flattener, jsonio.loads(ev.doc), ev.event_id, ev.user_id, ev.event_time_us)
        if isinstance(ev, DeadLetter):
            bad += 1
            out.write(f"line {n}: DEAD LETTER {ev.reason}: {ev.message}\n")
            continue
        if isinstance(rows, str):
            bad += 1
            out.write(f"line {n}: DEAD LETTER flatten_error: {rows}\n")
            continue
        good += 1
        if limit and shown >= limit:
            continue
        shown += 1
        for r in rows:
            t = table if not r.table else f"{table}__{r.table}"
            out.write(f"line {n} -> {t} [{r.row_id}]\n")
            for col, val in r.columns.items():
                out.write(f"    {col:<48} {r.types.get(col, '?'):<10} {orjson.dumps(val).decode()[:80]}\n")
    out.write(f"\n{good} events flattened, {bad} dead letters"
              f"{f' (showing first {shown})' if limit and good > shown else ''}\n")
    return 0


def _flat(flattener: Flattener, doc: dict, event_id: str, user_id: str, t_us: int):
    try:
        return flattener.flatten(doc, event_id=event_id, user_id=user_id, event_time_us=t_us)
    except FlattenError as exc:
        return f"{exc}"


def show_schema(contract: Contract, partner: str, table: Optional[str], out: TextIO) -> int:
    """Print every version of the partner's table schemas from the warehouse."""
    from flatten.schema import TableSchema
    from sinks.duckdb_store import open_readonly

    p = contract.partner(partner)
    if contract.warehouse.kind != "duckdb":
        out.write("schema: only the embedded warehouse keeps schema history; for BigQuery use `bq show --schema`\n")
        return 2
    con = open_readonly(contract.warehouse.path)
    try:
        rows = con.execute("SELECT table_name, version, schema_json, updated_at FROM _headwater_schemas "
                           "WHERE table_name = ? OR table_name LIKE ? ORDER BY table_name, version",
                           [table or p.table.name, (table or p.table.name) + "\\_\\_%"]).fetchall()
    finally:
        con.close()
    if not rows:
        out.write(f"no schema recorded yet for partner {partner!r} (run the pipeline first)\n")
        return 1
    prev: dict[str, set] = {}
    for name, version, js, at in rows:
        s = TableSchema.from_json(js)
        before = prev.get(name, set())
        cols = {c.name for c in s.columns}
        added = [c for c in s.columns if c.name not in before]
        out.write(f"{name} v{version} ({at:%Y-%m-%d %H:%M:%S}) {len(s.columns)} columns"
                  f"{', added: ' + ', '.join(c.name for c in added) if before else ''}\n")
        prev[name] = cols
    for name in prev:
        last = [TableSchema.from_json(js) for n, _, js, _ in rows if n == name][-1]
        out.write(f"\n{name} (current)\n")
        for c in last.columns:
            out.write(f"  {c.name:<50} {c.type:<10} {c.mode}\n")
    return 0
