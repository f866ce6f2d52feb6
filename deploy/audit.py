"""``headwater audit``: look for raw values of annotated (PII) fields where only masked ones belong.

Scans the warehouse (every table of the contract's DuckDB file or BigQuery dataset: partner tables, child
tables, dead letters, aggregates), and optionally a log file, with two checks:

* **pattern**: every string value (REPEATED elements and JSON text included; dead-letter payloads and
  messages; each log line) against a regular expression per annotation: ``columns[j].pattern`` from the
  contract, else a default chosen by the path's name tokens (ssn / social, email / mail, card / pan / cc,
  iban, phone / tel / mobile / msisdn). Card numbers must also pass the Luhn check. Encrypted dead-letter
  payloads (``enc:v1:``) are skipped: they hold no plaintext.
* **column**: a column whose flattened name matches an annotation (the masker's own rule:
  ``Masker.column_rule``; variant suffixes ``__v_<type>`` are stripped) must hold only values of the
  policy's shape: ``hash`` 64 hex digits, ``tokenize`` ``tok_`` + 32 hex digits, ``redact`` ``****...``,
  ``drop`` nothing at all.

Hits name the place (table, column, row id, or file:line) and the check, never the value. Exit code 1
on any hit, 0 when clean, 2 for configuration errors (raised as usual by the contract loader).
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Optional, TextIO

from flatten.mask import Masker
from flatten.names import normalize_key
from flatten.options import PiiPolicy

__all__ = ["AuditHit", "AuditReport", "audit", "default_pattern", "run_audit"]

#: Default patterns by a name token of the annotated path (raw-looking values; masked ones never match).
_SSN = r"(?<![0-9A-Za-z])\d{3}-\d{2}-\d{4}(?![0-9A-Za-z])"
_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
_CARD = r"(?<![0-9A-Za-z-])(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{1,7}|\d{4}[ -]\d{6}[ -]\d{5})(?![0-9A-Za-z-])"
_IBAN = r"(?<![0-9A-Za-z])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![0-9A-Za-z])"
_PHONE = r"(?<![0-9A-Za-z+])\+\d{1,3}(?:[ -]?\(?\d{1,4}\)?){2,5}(?![0-9A-Za-z])"
_DEFAULTS = {
    "ssn": ("ssn", _SSN), "social": ("ssn", _SSN), "sin": ("ssn", _SSN),
    "email": ("email", _EMAIL), "mail": ("email", _EMAIL),
    "card": ("card", _CARD), "pan": ("card", _CARD), "cc": ("card", _CARD), "ccnum": ("card", _CARD),
    "account": ("card", _CARD), "accounts": ("card", _CARD),
    "iban": ("iban", _IBAN),
    "phone": ("phone", _PHONE), "tel": ("phone", _PHONE), "mobile": ("phone", _PHONE), "msisdn": ("phone", _PHONE),
}
_SHAPES = {
    PiiPolicy.HASH: re.compile(r"[0-9a-f]{64}\Z"),
    PiiPolicy.TOKENIZE: re.compile(r"tok_[0-9a-f]{32}\Z"),
    PiiPolicy.REDACT: re.compile(r"\*{4}", re.S),
}
_VARIANT = re.compile(r"__v_[a-z0-9]+(?:_repeated)?\Z")
_META_TABLES = ("_headwater_schemas", "_headwater_tables")


def default_pattern(path: str) -> Optional[tuple[str, str]]:
    """(kind, regex) for an annotated path by its name tokens (last token first), or None."""
    toks = [t for seg in path.replace("[]", "").split(".") if seg != "*" for t in normalize_key(seg).split("_")]
    for t in reversed(toks):
        if t in _DEFAULTS:
            return _DEFAULTS[t]
    return None


def _luhn(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


@dataclass(frozen=True)
class AuditHit:
    where: str  # "warehouse" | "dead_letters" | "log"
    location: str  # table.column or file
    row: str  # row id / coords / line number
    annotation: str  # partner: path
    check: str  # "pattern:<kind>" | "column:<policy>"


@dataclass
class AuditReport:
    tables: int = 0
    rows: int = 0
    values: int = 0
    log_lines: int = 0
    hits: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"tables": self.tables, "rows": self.rows, "values": self.values, "log_lines": self.log_lines,
                "hits": [asdict(h) for h in self.hits], "clean": not self.hits}


class _Rules:
    """Every partner's patterns and column rules (built once)."""

    def __init__(self, contract: Any) -> None:
        self.patterns: list[tuple[str, str, re.Pattern]] = []  # (annotation label, kind, regex)
        self.maskers: dict[str, tuple[Masker, str]] = {}  # partner -> (masker, main table)
        for p in contract.partners:
            self.maskers[p.name] = (Masker(p.columns, os.urandom(32)), p.table.name)  # matching only: no key needed
            for a in p.columns:
                if a.pattern:
                    kind, rx = "custom", a.pattern
                else:
                    d = default_pattern(a.path)
                    if d is None:
                        continue
                    kind, rx = d
                self.patterns.append((f"{p.name}: {a.path}", kind, re.compile(rx)))

    def scan_text(self, text: str) -> Iterator[tuple[str, str]]:
        """(annotation, kind) for every pattern with a raw-looking match in ``text``."""
        for label, kind, rx in self.patterns:
            for m in rx.finditer(text):
                if kind == "card" and not _luhn(re.sub(r"[ -]", "", m.group(0))):
                    continue
                yield label, kind
                break

    def column_rule(self, table: str, column: str) -> Optional[tuple[str, Any]]:
        """(annotation label, MaskRule) for a partner table's column whose name matches an annotation."""
        if column.startswith("_"):
            return None  # envelope columns (ids are checked by pattern)
        col = _VARIANT.sub("", column)
        for partner, (masker, main) in self.maskers.items():
            if table == main:
                full = col
            elif table.startswith(main + "__"):
                full = table[len(main) + 2:] + "__" + col
            else:
                continue
            rule = masker.column_rule(full)
            if rule is not None:
                return f"{partner}: {rule.path}", rule
        return None


def _strings(v: Any) -> Iterator[str]:
    """The text values in ``v``: JSON text (JSON columns, dead-letter payloads, metrics) is parsed and its string
    leaves and keys yielded (numbers are not text: a 13-digit epoch must not pass for a card number)."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        v = bytes(v).decode("utf-8", "replace")
    if isinstance(v, str):
        if v[:1] in ("{", "[") and v[-1:] in ("}", "]"):
            try:
                doc = json.loads(v)
            except (ValueError, RecursionError):
                yield v
                return
            stack = [doc]
            while stack:
                x = stack.pop()
                if isinstance(x, str):
                    yield x
                elif isinstance(x, dict):
                    yield from x.keys()
                    stack.extend(x.values())
                elif isinstance(x, list):
                    stack.extend(x)
            return
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _strings(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _strings(x)


def _shape_ok(v: Any, policy: PiiPolicy) -> bool:
    if v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(_shape_ok(x, policy) for x in v)
    if policy is PiiPolicy.DROP:
        return False
    return isinstance(v, str) and _SHAPES[policy].match(v) is not None


def audit_rows(rules: _Rules, table: str, columns: list[str], rows: Iterable[tuple], report: AuditReport,
               dead_letters: bool = False) -> None:
    """Check one table's rows (tuples in ``columns`` order)."""
    report.tables += 1
    col_rules = {c: rules.column_rule(table, c) for c in columns}
    rid_ix = columns.index("_row_id") if "_row_id" in columns else columns.index("coords") if "coords" in columns \
        else None
    where = "dead_letters" if dead_letters else "warehouse"
    for row in rows:
        report.rows += 1
        rid = str(row[rid_ix]) if rid_ix is not None else f"#{report.rows}"
        for c, v in zip(columns, row):
            if v is None:
                continue
            report.values += 1
            cr = col_rules[c]
            if cr is not None and not _shape_ok(v, cr[1].policy):
                report.hits.append(AuditHit(where, f"{table}.{c}", rid, cr[0], f"column:{cr[1].policy.value}"))
            for text in _strings(v):
                if text.startswith("enc:v1:"):
                    continue  # encrypted dead-letter payload
                for label, kind in rules.scan_text(text):
                    report.hits.append(AuditHit(where, f"{table}.{c}", rid, label, f"pattern:{kind}"))


def _duckdb_tables(contract: Any, sample: Optional[int]) -> Iterator[tuple[str, list[str], list[tuple]]]:
    from sinks.duckdb_store import open_readonly

    con = open_readonly(contract.warehouse.path)
    try:
        names = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1").fetchall()]
        for t in names:
            if t in _META_TABLES:
                continue
            q = f'SELECT * FROM "{t}"' + (f" USING SAMPLE reservoir({int(sample)} ROWS) REPEATABLE (7)" if sample else "")
            cur = con.execute(q)
            cols = [d[0] for d in cur.description]
            yield t, cols, cur.fetchall()
    finally:
        con.close()


def _bigquery_tables(contract: Any, sample: Optional[int]) -> Iterator[tuple[str, list[str], list[tuple]]]:
    from sinks.bq_client import make_client

    wh = contract.warehouse
    client = make_client(wh)
    for t in sorted(client.list_tables(f"{wh.project}.{wh.dataset}", retry=None), key=lambda x: x.table_id):
        q = f"SELECT * FROM `{wh.project}.{wh.dataset}.{t.table_id}`" + (f" LIMIT {int(sample)}" if sample else "")
        res = client.query(q).result(retry=None)
        cols = [f.name for f in res.schema]
        yield t.table_id, cols, [tuple(r.values()) for r in res]


def audit(contract: Any, sample: Optional[int] = None, log: Optional[str] = None) -> AuditReport:
    """Scan the contract's warehouse (``sample`` rows per table, default all) and ``log``; see the module doc."""
    rules = _Rules(contract)
    report = AuditReport()
    wh = contract.warehouse
    tables = _bigquery_tables(contract, sample) if wh.kind == "bigquery" else _duckdb_tables(contract, sample)
    for table, cols, rows in tables:
        audit_rows(rules, table, cols, rows, report, dead_letters=table == wh.dead_letter_table)
    if log:
        with open(log, "r", encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                report.log_lines += 1
                for label, kind in rules.scan_text(line):
                    report.hits.append(AuditHit("log", log, str(n), label, f"pattern:{kind}"))
    return report


def run_audit(contract: Any, sample: Optional[int], log: Optional[str], as_json: bool, out: TextIO = sys.stdout) -> int:
    """The CLI's ``audit``: prints the report (human or ``--json``); 1 on any hit, else 0."""
    report = audit(contract, sample=sample, log=log)
    if as_json:
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        for h in report.hits[:200]:
            out.write(f"HIT {h.where:<12} {h.location} [{h.row}]: {h.check} ({h.annotation})\n")
        if len(report.hits) > 200:
            out.write(f"... and {len(report.hits) - 200} more hits\n")
        scope = f"{report.tables} tables, {report.rows:,} rows, {report.values:,} values" + \
            (f", {report.log_lines:,} log lines" if log else "")
        verdict = "CLEAN" if not report.hits else f"{len(report.hits)} HITS (raw-looking values of annotated fields)"
        out.write(f"audit: {scope} -> {verdict}\n")
    return 1 if report.hits else 0
