"""Flatten one nested JSON event into warehouse rows (main table + child tables).

Pure Python, no Beam: the Flatten DoFn builds one :class:`Flattener` per
partner in ``DoFn.setup`` and calls :meth:`Flattener.flatten` per event.

Contract
--------
In: an already *masked* event document (``dict`` as produced by orjson), its
event id, user id and event time (microseconds since the epoch).
Out: ``list[FlatRow]``, main row first, child rows after it in document order
(depth first). Raises :class:`FlattenError` (terminal; the caller dead-letters
the event with ``Reason.FLATTEN_ERROR``); it never raises anything else for
JSON-shaped input. Messages name paths, never values.

Rules (details and rationale in docs/flatten.md):

* objects flatten to ``parent__child`` columns, names per :mod:`flatten.names`;
* ``null`` values, empty objects and empty arrays produce no column;
* an array whose non-null elements are all objects becomes a child table named
  by its path (``items``, ``items__offers``); each element is one row carrying
  ``_row_id``, ``_parent_row_id``, ``_event_id``, ``_index`` (position in the
  original list) and ``_event_time``; ``null`` elements produce no row;
* an array whose non-null elements are scalars of one kind (all strings, all
  bools, or all numbers) becomes a REPEATED column (``scalar_arrays="repeated"``,
  nulls dropped because BigQuery arrays cannot hold NULL) or a child table with
  one ``value`` column (``scalar_arrays="child"``);
* anything else (objects mixed with scalars, strings mixed with numbers, arrays
  of arrays) is kept whole as one JSON column at the array's path;
* a container reached by ``max_depth`` keys (array indices do not count) is kept
  whole as a JSON column.
"""
from __future__ import annotations

from hashlib import sha256
from typing import Any, NamedTuple

from flatten.infer import (
    INT64_MAX,
    INT64_MIN,
    JsonTextError,
    epoch_to_timestamp,
    int_value,
    parse_timestamp,
    to_json_text,
    us_to_timestamp,
)
from flatten.names import join_name, resolve_keys
from flatten.options import FlattenOptions

__all__ = ["FlatRow", "FlattenError", "Flattener", "child_row_id", "ENVELOPE_COLUMNS", "CHILD_COLUMNS", "MAX_COLUMNS"]

#: Columns added to every main row.
ENVELOPE_COLUMNS = ("_event_id", "_user_id", "_event_time")
#: Columns added to every child row.
CHILD_COLUMNS = ("_row_id", "_parent_row_id", "_event_id", "_index", "_event_time")
#: BigQuery's per-table column limit; a row with more is a FlattenError.
MAX_COLUMNS = 10_000
_NAME_CACHE_MAX = 50_000


class FlatRow(NamedTuple):
    """One warehouse row. ``table`` is "" for the main table, else the array path."""

    table: str
    row_id: str
    columns: dict
    types: dict


class FlattenError(Exception):
    """The event cannot be flattened. Terminal: dead-letter it, do not retry.

    ``reason`` is a stable short code (``too_deep``, ``unencodable``,
    ``unsupported_type``, ``too_many_columns``, ``bad_event_time``); the message
    names the column path but never a value.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def child_row_id(event_id: str, parent_row_id: str, table: str, index: int) -> str:
    """Deterministic child row id: sha256(event id, parent row id, table path, index) hex[:32]."""
    return sha256(f"{event_id}\x1f{parent_row_id}\x1f{table}\x1f{index}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _json_col(v: Any, path: str) -> str:
    try:
        return to_json_text(v)
    except JsonTextError as exc:
        raise FlattenError("unencodable", f"column {path!r}: {exc}") from None


class Flattener:
    """A flattener compiled once per :class:`FlattenOptions` (build it in ``DoFn.setup``).

    Thread-compatible: the only mutable state is a bounded cache of resolved
    column names keyed by (path, object keys), which never changes results.
    """

    def __init__(self, options: FlattenOptions) -> None:
        self.options = options
        self._max_depth = options.max_depth
        self._scalar_child = options.scalar_arrays == "child"
        self._detect = options.detect_timestamps
        self._ts_cols = frozenset(options.timestamp_columns)
        self._no_ts_cols = frozenset(options.no_timestamp_columns)
        self._percol = bool(self._ts_cols or self._no_ts_cols)
        self._names: dict[tuple, list[str]] = {}

    # ------------------------------------------------------------------ API
    def flatten(self, doc: dict, *, event_id: str, user_id: str, event_time_us: int) -> list[FlatRow]:
        """Rows for one event: the main row (``row_id == event_id``) then child rows."""
        if type(doc) is not dict:
            raise FlattenError("unsupported_type", f"event document is a {type(doc).__name__}, not an object")
        try:
            et = us_to_timestamp(event_time_us)
        except (OverflowError, TypeError, ValueError):
            raise FlattenError("bad_event_time", "event time out of range") from None
        cols: dict = {"_event_id": event_id, "_user_id": user_id, "_event_time": et}
        types: dict = {"_event_id": "STRING", "_user_id": "STRING", "_event_time": "TIMESTAMP"}
        rows: list[FlatRow] = [None]  # type: ignore[list-item]  # main row goes first
        ctx = (event_id, et, rows)
        if doc:
            self._walk(doc, "", 0, cols, types, "", event_id, ctx)
        if len(cols) > MAX_COLUMNS:
            raise FlattenError("too_many_columns", f"main table: {len(cols)} columns > {MAX_COLUMNS}")
        rows[0] = FlatRow("", event_id, cols, types)
        return rows

    # ------------------------------------------------------------ internals
    def _resolve(self, prefix: str, obj: dict) -> list[str]:
        key = (prefix, tuple(obj))
        names = self._names.get(key)
        if names is None:
            names = [join_name(prefix, seg) for seg in resolve_keys(key[1])]
            if len(self._names) >= _NAME_CACHE_MAX:
                self._names.clear()
            self._names[key] = names
        return names

    def _walk(self, obj: dict, prefix: str, depth: int, cols: dict, types: dict,
              table: str, row_id: str, ctx: tuple) -> None:
        """Flatten ``obj`` (reached by ``depth`` keys) into ``cols``/``types`` under ``prefix``."""
        names = self._names.get((prefix, tuple(obj)))
        if names is None:
            names = self._resolve(prefix, obj)
        depth += 1
        deep = depth >= self._max_depth
        detect = self._detect
        percol = self._percol
        for name, v in zip(names, obj.values()):
            t = type(v)
            if percol and (t is str or t is int or t is float):
                if self._percol_scalar(v, name, table, cols, types):
                    continue
            if t is str:
                if detect and len(v) > 9 and v[4] == "-" and v[7] == "-":
                    r = parse_timestamp(v)
                    if r is not None:
                        cols[name], types[name] = r
                        continue
                cols[name] = v
                types[name] = "STRING"
            elif t is int:
                if INT64_MIN <= v <= INT64_MAX:
                    cols[name] = v
                    types[name] = "INT64"
                else:
                    cols[name], types[name] = int_value(v)
            elif t is dict:
                if not v:
                    continue
                if deep:
                    cols[name] = _json_col(v, name)
                    types[name] = "JSON"
                else:
                    self._walk(v, name, depth, cols, types, table, row_id, ctx)
            elif t is float:
                cols[name] = v
                types[name] = "FLOAT64"
            elif t is bool:
                cols[name] = v
                types[name] = "BOOL"
            elif t is list:
                if not v:
                    continue
                if deep:
                    cols[name] = _json_col(v, name)
                    types[name] = "JSON"
                else:
                    self._array(v, name, depth, cols, types, table, row_id, ctx)
            elif v is None:
                continue
            else:
                raise FlattenError("unsupported_type", f"column {name!r}: unsupported value type {t.__name__}")

    def _percol_scalar(self, v: Any, name: str, table: str, cols: dict, types: dict) -> bool:
        """Per-column timestamp overrides; True when the value was stored."""
        full = table + "__" + name if table else name
        if full in self._ts_cols:
            if type(v) is str:
                r = parse_timestamp(v)
                if r is not None and r[1] == "DATE":
                    r = (v + "T00:00:00.000000Z", "TIMESTAMP")
            else:
                ts = epoch_to_timestamp(v)
                r = (ts, "TIMESTAMP") if ts is not None else None
            if r is not None:
                cols[name], types[name] = r
                return True
            return False  # not a timestamp: stored by its own type (a schema conflict decides)
        if full in self._no_ts_cols and type(v) is str:
            cols[name] = v
            types[name] = "STRING"
            return True
        return False

    def _array(self, arr: list, name: str, depth: int, cols: dict, types: dict,
               table: str, row_id: str, ctx: tuple) -> None:
        kinds = set()
        for el in arr:
            t = type(el)
            if t is int or t is float:
                kinds.add(float)
            elif el is not None:
                kinds.add(t)
        if not kinds:
            return  # only nulls: nothing to store, like an empty array
        if len(kinds) > 1 or list in kinds:
            cols[name] = _json_col(arr, name)
            types[name] = "JSON"
            return
        kind = kinds.pop()
        child = name if not table else join_name(table, name)
        if kind is dict:
            self._child_rows(arr, child, depth, row_id, ctx, None)
        elif kind in (str, float, bool):
            if self._scalar_child:
                self._child_rows(arr, child, depth, row_id, ctx, kind)
            else:
                vals, typ = self._scalar_list(arr, kind, child)
                cols[name] = vals
                types[name] = typ + "[]"
        else:
            raise FlattenError("unsupported_type", f"column {name!r}: unsupported array element type {kind.__name__}")

    def _scalar_list(self, arr: list, kind: type, path: str) -> tuple[list, str]:
        """Non-null elements of a one-kind scalar array, converted, and their element type."""
        vals = [x for x in arr if x is not None]
        if kind is bool:
            return vals, "BOOL"
        if kind is float:
            if all(type(x) is int for x in vals):
                if all(INT64_MIN <= x <= INT64_MAX for x in vals):
                    return vals, "INT64"
                conv = [int_value(x) for x in vals]
                if all(c[1] == "NUMERIC" or c[1] == "INT64" for c in conv):
                    return [str(x) for x in vals], "NUMERIC"
                return [str(x) for x in vals], "STRING"
            return [float(x) for x in vals], "FLOAT64"
        # strings
        if path in self._ts_cols or (self._detect and path not in self._no_ts_cols):
            conv2 = [parse_timestamp(x) for x in vals]
            if conv2 and all(c is not None for c in conv2):
                kinds = {c[1] for c in conv2}  # type: ignore[index]
                if len(kinds) == 1:
                    return [c[0] for c in conv2], kinds.pop()  # type: ignore[index]
        return vals, "STRING"

    def _child_rows(self, arr: list, child: str, depth: int, parent_id: str, ctx: tuple, scalar: Any) -> None:
        event_id, et, rows = ctx
        for i, el in enumerate(arr):
            if el is None:
                continue
            rid = sha256(f"{event_id}\x1f{parent_id}\x1f{child}\x1f{i}".encode("utf-8", "surrogatepass")).hexdigest()[:32]
            cols = {"_row_id": rid, "_parent_row_id": parent_id, "_event_id": event_id, "_index": i, "_event_time": et}
            types = {"_row_id": "STRING", "_parent_row_id": "STRING", "_event_id": "STRING", "_index": "INT64",
                     "_event_time": "TIMESTAMP"}
            slot = len(rows)
            rows.append(None)  # type: ignore[arg-type]  # keep parent before its own children
            if scalar is None:
                if el:
                    self._walk(el, "", depth, cols, types, child, rid, ctx)
            else:
                self._walk({"value": el}, "", depth, cols, types, child, rid, ctx)
            if len(cols) > MAX_COLUMNS:
                raise FlattenError("too_many_columns", f"table {child!r}: {len(cols)} columns > {MAX_COLUMNS}")
            rows[slot] = FlatRow(child, rid, cols, types)

