"""Versioned table schemas and per-row schema reconciliation (evolution).

Pure Python. :func:`reconcile` takes a table's current schema and one
flattened row (``FlatRow.columns`` / ``FlatRow.types``) and returns the schema
the row needs, the row's values adjusted to it, and the type conflicts.

Rules (docs/flatten.md has the full table):

* A new column is added (``NULLABLE``, or ``REPEATED`` for ``T[]`` types) and
  the schema version goes up by one per reconcile call that changes anything.
* Safe widenings are applied silently, converting the value:
  INT64 -> FLOAT64 / NUMERIC; integral FLOAT64 -> INT64; DATE -> TIMESTAMP
  (midnight UTC); BOOL/INT64/FLOAT64/NUMERIC/DATE/TIMESTAMP -> STRING (canonical
  text); anything -> JSON (JSON text). The same applies element-wise to
  REPEATED columns. REPEATED vs NULLABLE never widens.
* Any other mismatch is a conflict, handled per :class:`SchemaMode`:

  - ``evolve``: the value moves to the variant column ``<col>__v_<type>``
    (``<col>__v_<type>_repeated`` for arrays), added to the schema if needed.
  - ``freeze``: ``Reconciled.conflicts`` is non-empty; the schema and columns
    are returned unchanged (nothing from a rejected row leaks into the schema)
    and the caller dead-letters the row with :func:`conflict_message`.
  - ``discard_value``: the value becomes ``None`` (column kept).

  ``conflicts`` is non-empty **only** in freeze mode, so "conflicts => dead
  letter" is always right; conflicts absorbed by evolve/discard_value are in
  ``Reconciled.resolved`` (for counters).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

import orjson

from flatten.infer import INT64_MAX, INT64_MIN, JsonTextError, to_json_text
from flatten.options import SchemaMode

__all__ = [
    "ColumnSchema",
    "TableSchema",
    "Conflict",
    "Reconciled",
    "reconcile",
    "conflict_message",
    "variant_name",
    "SchemaRegistry",
]

NULLABLE = "NULLABLE"
REPEATED = "REPEATED"


class ColumnSchema(NamedTuple):
    name: str
    type: str  # BigQuery type name, without "[]"
    mode: str  # "NULLABLE" | "REPEATED"


class Conflict(NamedTuple):
    column: str
    existing_type: str  # e.g. "INT64" or "STRING[]"
    new_type: str


class Reconciled(NamedTuple):
    schema: "TableSchema"
    columns: dict
    conflicts: list  # list[Conflict]; non-empty only in freeze mode -> dead-letter the row
    changed: bool
    resolved: list = []  # list[Conflict] absorbed by evolve / discard_value


def _split(t: str) -> tuple[str, str]:
    return (t[:-2], REPEATED) if t.endswith("[]") else (t, NULLABLE)


def _type_str(c: ColumnSchema) -> str:
    return c.type + "[]" if c.mode == REPEATED else c.type


@dataclass(frozen=True)
class TableSchema:
    """An immutable, versioned table schema. ``version`` 0 is the empty schema."""

    columns: tuple[ColumnSchema, ...] = ()
    version: int = 0
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cols = tuple(ColumnSchema(*c) for c in self.columns)
        object.__setattr__(self, "columns", cols)
        object.__setattr__(self, "_index", {c.name: _type_str(c) for c in cols})
        if len(self._index) != len(cols):
            raise ValueError("duplicate column names in schema")

    def get(self, name: str) -> Optional[ColumnSchema]:
        t = self._index.get(name)
        return None if t is None else ColumnSchema(name, *_split(t))

    def type_of(self, name: str) -> Optional[str]:
        """The column's type string (``"INT64"``, ``"STRING[]"``) or None."""
        return self._index.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.columns)

    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def to_json(self) -> str:
        return orjson.dumps(
            {"version": self.version, "columns": [{"name": c.name, "type": c.type, "mode": c.mode} for c in self.columns]}
        ).decode()

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "TableSchema":
        d = orjson.loads(text)
        return cls(tuple(ColumnSchema(c["name"], c["type"], c["mode"]) for c in d["columns"]), int(d["version"]))

    def to_bigquery(self) -> list[dict]:
        """BigQuery ``schema.fields`` JSON (JSON type as BigQuery's ``JSON``)."""
        return [{"name": c.name, "type": c.type, "mode": c.mode} for c in self.columns]


def variant_name(column: str, type_str: str) -> str:
    base, mode = _split(type_str)
    return f"{column}__v_{base.lower()}" + ("_repeated" if mode == REPEATED else "")


def conflict_message(conflicts: list) -> str:
    """Dead-letter message for a freeze-mode rejection: columns and both types, no values."""
    return "; ".join(
        f"type conflict: column {c.column!r} is {c.existing_type}, value is {c.new_type}" for c in conflicts
    )


_NO = object()


def _canon_text(v: Any, t: str) -> Any:
    if t == "BOOL":
        return "true" if v else "false"
    if t == "FLOAT64":
        return repr(float(v))
    return str(v)


def _widen_scalar(v: Any, src: str, dst: str) -> Any:
    """Value converted from type ``src`` to column type ``dst``, or ``_NO``."""
    if v is None:
        return None
    if dst == "FLOAT64" and src == "INT64":
        return float(v)
    if dst == "NUMERIC" and src == "INT64":
        return str(v)
    if dst == "INT64" and src == "FLOAT64":
        if v == v and v not in (float("inf"), float("-inf")) and float(v).is_integer() and INT64_MIN <= v <= INT64_MAX:
            return int(v)
        return _NO
    if dst == "TIMESTAMP" and src == "DATE":
        return v + "T00:00:00.000000Z"
    if dst == "STRING" and src in ("BOOL", "INT64", "FLOAT64", "NUMERIC", "DATE", "TIMESTAMP"):
        return _canon_text(v, src)
    return _NO


def _widen(v: Any, src: str, dst: str) -> Any:
    sb, sm = _split(src)
    db, dm = _split(dst)
    if sm != dm:
        return _NO
    if db == "JSON":
        if sb == "JSON":
            return v
        try:
            return to_json_text(v)
        except JsonTextError:
            return _NO
    if sm == NULLABLE:
        return _widen_scalar(v, sb, db)
    out = []
    for x in v:
        y = _widen_scalar(x, sb, db)
        if y is _NO:
            return _NO
        out.append(y)
    return out


def reconcile(schema: TableSchema, columns: dict, types: dict, mode: SchemaMode) -> Reconciled:
    """Fit one row to ``schema``; see the module docstring for the rules."""
    idx = schema._index
    for k, t in types.items():
        if idx.get(k) != t:
            break
    else:  # fast path: every column exists with the same type
        return Reconciled(schema, columns, [], False, [])

    out = dict(columns)
    added: list[ColumnSchema] = []
    added_idx: dict[str, str] = {}
    conflicts: list[Conflict] = []
    for k, t in types.items():
        cur = idx.get(k) or added_idx.get(k)
        if cur == t:
            continue
        if cur is None:
            base, m = _split(t)
            added.append(ColumnSchema(k, base, m))
            added_idx[k] = t
            continue
        w = _widen(out.get(k), t, cur)
        if w is not _NO:
            out[k] = w
            continue
        conflicts.append(Conflict(k, cur, t))
        if mode == SchemaMode.EVOLVE:
            vn = variant_name(k, t)
            out[vn] = out.pop(k)
            vcur = idx.get(vn) or added_idx.get(vn)
            if vcur is None:
                base, m = _split(t)
                added.append(ColumnSchema(vn, base, m))
                added_idx[vn] = t
        elif mode == SchemaMode.DISCARD_VALUE:
            out[k] = None
    if mode == SchemaMode.FREEZE:
        if conflicts:
            return Reconciled(schema, columns, conflicts, False, [])
    if not added:
        return Reconciled(schema, out, [], False, conflicts)
    new = TableSchema(schema.columns + tuple(added), schema.version + 1)
    return Reconciled(new, out, [], True, conflicts)


class SchemaRegistry:
    """In-memory schemas of many tables with their version history (inspectable).

    Not thread-safe; one per DoFn instance or guard it. ``history(table)`` lists
    every schema version as JSON text, oldest first.
    """

    def __init__(self, initial: Optional[dict[str, TableSchema]] = None) -> None:
        self._schemas: dict[str, TableSchema] = dict(initial or {})
        self._history: dict[str, list[str]] = {t: [s.to_json()] for t, s in self._schemas.items()}

    def get(self, table: str) -> TableSchema:
        return self._schemas.get(table) or TableSchema()

    def tables(self) -> tuple[str, ...]:
        return tuple(sorted(self._schemas))

    def reconcile(self, table: str, columns: dict, types: dict, mode: SchemaMode) -> Reconciled:
        rec = reconcile(self.get(table), columns, types, mode)
        if rec.changed:
            self._schemas[table] = rec.schema
            self._history.setdefault(table, []).append(rec.schema.to_json())
        return rec

    def history(self, table: str) -> list[str]:
        return list(self._history.get(table, []))

    def to_json(self) -> str:
        return orjson.dumps({t: orjson.loads(s.to_json()) for t, s in sorted(self._schemas.items())}).decode()
