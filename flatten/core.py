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
from typing import Any, NamedTuple, Optional

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
from flatten.plan import compile_plan

__all__ = ["FlatRow", "FlattenError", "Flattener", "child_row_id", "ENVELOPE_COLUMNS", "CHILD_COLUMNS", "MAX_COLUMNS"]

#: Columns added to every main row.
ENVELOPE_COLUMNS = ("_event_id", "_user_id", "_event_time")
#: Columns added to every child row.
CHILD_COLUMNS = ("_row_id", "_parent_row_id", "_event_id", "_index", "_event_time")
#: BigQuery's per-table column limit; a row with more is a FlattenError.
MAX_COLUMNS = 10_000
#: Shapes compiled per object site / per flattener; past either the site walks generically.
_PLANS_PER_SITE = 32
_PLANS_TOTAL = 4096
#: A shape is compiled the second time it is seen (one-off shapes are not worth exec()).
_COMPILE_AFTER = 2


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


class _Site:
    """One place objects occur: (table, column prefix, key depth). Holds its caches."""

    __slots__ = ("table", "prefix", "depth", "deep", "plans", "seen", "names", "subs", "arrays", "generic")

    def __init__(self, table: str, prefix: str, depth: int, max_depth: int) -> None:
        self.table = table
        self.prefix = prefix
        self.depth = depth  # keys needed to reach the objects of this site
        self.deep = depth + 1 >= max_depth  # containers in these objects are kept as JSON
        self.plans: dict[tuple, Any] = {}
        self.seen: dict[tuple, int] = {}
        self.names: dict[tuple, list[str]] = {}
        self.subs: dict[str, _Site] = {}
        self.arrays: dict[str, tuple[str, _Site]] = {}
        self.generic = False


class Flattener:
    """A flattener compiled once per :class:`FlattenOptions` (build it in ``DoFn.setup``).

    Objects are handled per *site* (table, path, depth). Each object shape
    (keys and value types) seen twice at a site is compiled into a
    straight-line Python function (:mod:`flatten.plan`); sites with too many
    shapes (maps keyed by ids ...) fall back to a generic loop with identical
    output. Caches never change results. Not thread-safe: one per DoFn instance.
    """

    def __init__(self, options: FlattenOptions) -> None:
        self.options = options
        self._max_depth = options.max_depth
        self._scalar_child = options.scalar_arrays == "child"
        self._detect = options.detect_timestamps
        self._ts_cols = frozenset(options.timestamp_columns)
        self._no_ts_cols = frozenset(options.no_timestamp_columns)
        self._percol = bool(self._ts_cols or self._no_ts_cols)
        self._root = _Site("", "", 0, self._max_depth)
        self._nplans = 0
        self._et_cache: dict[int, str] = {}
        self.compile_enabled = True

    # ------------------------------------------------------------------ API
    def flatten(self, doc: dict, *, event_id: str, user_id: str, event_time_us: int) -> list[FlatRow]:
        """Rows for one event: the main row (``row_id == event_id``) then child rows."""
        if type(doc) is not dict:
            raise FlattenError("unsupported_type", f"event document is a {type(doc).__name__}, not an object")
        et = self._event_time(event_time_us)
        cols: dict = {"_event_id": event_id, "_user_id": user_id, "_event_time": et}
        types: dict = {"_event_id": "STRING", "_user_id": "STRING", "_event_time": "TIMESTAMP"}
        rows: list[FlatRow] = [None]  # type: ignore[list-item]  # main row goes first
        if doc:
            self._walk(doc, self._root, cols, types, event_id, (event_id, et, rows))
        if len(cols) > MAX_COLUMNS:
            raise FlattenError("too_many_columns", f"main table: {len(cols)} columns > {MAX_COLUMNS}")
        rows[0] = _new_row(FlatRow, ("", event_id, cols, types))
        return rows

    # ------------------------------------------------------------ internals
    def _event_time(self, us: int) -> str:
        if type(us) is not int:
            raise FlattenError("bad_event_time", f"event time is a {type(us).__name__}, not int microseconds")
        sec, frac = divmod(us, 1_000_000)
        head = self._et_cache.get(sec)
        if head is None:
            try:
                head = us_to_timestamp(sec * 1_000_000)[:19]
            except (OverflowError, ValueError):
                raise FlattenError("bad_event_time", "event time out of range") from None
            if len(self._et_cache) > 4096:
                self._et_cache.clear()
            self._et_cache[sec] = head
        return f"{head}.{frac:06d}Z"

    def _names(self, site: _Site, keys: tuple) -> list[str]:
        names = site.names.get(keys)
        if names is None:
            names = [join_name(site.prefix, seg) for seg in resolve_keys(keys)]
            if len(site.names) >= 1024:
                site.names.clear()
            site.names[keys] = names
        return names

    def _sub(self, site: _Site, name: str) -> _Site:
        sub = site.subs.get(name)
        if sub is None:
            sub = site.subs[name] = _Site(site.table, name, site.depth + 1, self._max_depth)
        return sub

    def _array_site(self, site: _Site, name: str) -> tuple[str, "_Site"]:
        """(child table name, element site) for the array column ``name`` at ``site``."""
        child = join_name(site.table, name) if site.table else name
        ent = site.arrays[name] = (child, _Site(child, "", site.depth + 1, self._max_depth))
        return ent

    def _walk(self, obj: dict, site: _Site, cols: dict, types: dict, row_id: str, ctx: tuple) -> None:
        """Flatten ``obj`` (an object at ``site``) into ``cols``/``types``."""
        if site.generic:
            return self._walk_generic(obj, site, cols, types, row_id, ctx)
        key = tuple(obj)
        plan = site.plans.get(key)
        if plan is None:
            plan = self._plan(obj, site, key)
            if plan is None:
                return self._walk_generic(obj, site, cols, types, row_id, ctx)
        plan(obj, cols, types, row_id, ctx)

    def _plan(self, obj: dict, site: _Site, key: tuple) -> Any:
        if not self.compile_enabled:
            return None
        n = site.seen.get(key, 0) + 1
        if n < _COMPILE_AFTER:
            if len(site.seen) >= 256:
                site.seen.clear()
            site.seen[key] = n
            return None
        if len(site.plans) >= _PLANS_PER_SITE or self._nplans >= _PLANS_TOTAL:
            site.generic = True
            site.seen.clear()
            return None
        site.seen.pop(key, None)
        plan = compile_plan(self, site, obj)
        site.plans[key] = plan
        self._nplans += 1
        return plan

    def _walk_generic(self, obj: dict, site: _Site, cols: dict, types: dict, row_id: str, ctx: tuple) -> None:
        """The reference walk: every value through :meth:`_value` (compiled plans are specialisations of it)."""
        value = self._value
        for name, v in zip(self._names(site, tuple(obj)), obj.values()):
            value(v, name, site, cols, types, row_id, ctx)

    def _value(self, v: Any, name: str, site: _Site, cols: dict, types: dict, row_id: str, ctx: tuple) -> None:
        """One value, generically: the one place the type rules live (the generic walk calls it per value;
        compiled plans call it whenever a value's type differs from the plan's speculation)."""
        t = type(v)
        if self._percol and (t is str or t is int or t is float):
            r = self.column_override(v, name, site.table)
            if r is not None:
                cols[name], types[name] = r
                return
        if t is str:
            if self._detect and len(v) > 9 and v[4] == "-" and v[7] == "-":
                r = parse_timestamp(v)
                if r is not None:
                    cols[name], types[name] = r
                    return
            cols[name] = v
            types[name] = "STRING"
        elif t is int:
            cols[name], types[name] = int_value(v)
        elif t is float:
            cols[name] = v
            types[name] = "FLOAT64"
        elif t is bool:
            cols[name] = v
            types[name] = "BOOL"
        elif t is dict or t is list:
            if not v:
                return
            if site.deep:
                cols[name] = _json_col(v, name)
                types[name] = "JSON"
            elif t is dict:
                self._walk(v, self._sub(site, name), cols, types, row_id, ctx)
            else:
                self._array(v, name, site, cols, types, row_id, ctx)
        elif v is not None:
            _unsupported(name, t)

    def column_override(self, v: Any, name: str, table: str) -> Optional[tuple]:
        """The per-column timestamp options (``timestamp_columns`` / ``no_timestamp_columns``) applied to one
        scalar ``v`` of column ``name`` in child table ``table`` ("" for the main table): ``(value, type)``
        when an option decides how it is stored, else None (stored by its own type)."""
        full = table + "__" + name if table else name
        if full in self._ts_cols:
            if type(v) is str:
                r = parse_timestamp(v)
                if r is not None and r[1] == "DATE":
                    r = (v + "T00:00:00.000000Z", "TIMESTAMP")
            else:
                ts = epoch_to_timestamp(v)
                r = (ts, "TIMESTAMP") if ts is not None else None
            return r  # None: not a timestamp, stored by its own type (a schema conflict decides)
        if full in self._no_ts_cols and type(v) is str:
            return (v, "STRING")
        return None

    def _array(self, arr: list, name: str, site: _Site, cols: dict, types: dict, row_id: str, ctx: tuple) -> None:
        kinds = set(map(type, arr))
        if len(kinds) != 1:
            kinds.discard(_NONE)
            if int in kinds and float in kinds:
                kinds.discard(int)
            if not kinds:
                return  # only nulls: nothing to store, like an empty array
            if len(kinds) > 1:
                cols[name] = _json_col(arr, name)
                types[name] = "JSON"
                return
        kind = kinds.pop()
        if kind is _NONE:
            return  # only nulls: nothing to store, like an empty array
        if kind is dict:
            ent = site.arrays.get(name)
            if ent is None:
                ent = self._array_site(site, name)
            self._child_rows(arr, ent[0], ent[1], row_id, ctx, False)
        elif kind is str or kind is int or kind is float or kind is bool:
            if self._scalar_child:
                ent = site.arrays.get(name)
                if ent is None:
                    ent = self._array_site(site, name)
                self._child_rows(arr, ent[0], ent[1], row_id, ctx, True)
            else:
                cols[name], types[name] = self._scalar_list(arr, kind, site, name)
        elif kind is list:
            cols[name] = _json_col(arr, name)
            types[name] = "JSON"
        else:
            _unsupported(name, kind)

    def _scalar_list(self, arr: list, kind: type, site: _Site, name: str) -> tuple[list, str]:
        """Non-null elements of a one-kind scalar array (ints and floats are one kind), converted, and their type."""
        vals = [x for x in arr if x is not None] if None in arr else arr
        if kind is str:
            detect = self._detect
            if self._percol:
                path = join_name(site.table, name) if site.table else name
                if path in self._ts_cols:
                    detect = True
                elif path in self._no_ts_cols:
                    detect = False
            if detect:
                for x in vals:
                    if not (len(x) > 9 and x[4] == "-" and x[7] == "-"):
                        return list(vals), "STRING[]"
                conv = [parse_timestamp(x) for x in vals]
                if None not in conv:
                    kinds = {c[1] for c in conv}  # type: ignore[index]
                    if len(kinds) == 1:
                        return [c[0] for c in conv], kinds.pop() + "[]"  # type: ignore[index]
            return list(vals), "STRING[]"
        if kind is bool:
            return list(vals), "BOOL[]"
        if kind is int or all(type(x) is int for x in vals):
            if min(vals) >= INT64_MIN and max(vals) <= INT64_MAX:
                return list(vals), "INT64[]"
            if all(int_value(x)[1] != "STRING" for x in vals):
                return [str(x) for x in vals], "NUMERIC[]"
            return [str(x) for x in vals], "STRING[]"
        return [float(x) for x in vals], "FLOAT64[]"

    def _child_rows(self, arr: list, child: str, site: _Site, parent_id: str, ctx: tuple, scalar: bool) -> None:
        event_id, et, rows = ctx
        walk = self._walk
        plans = site.plans
        h0 = sha256(f"{event_id}\x1f{parent_id}\x1f{child}\x1f".encode("utf-8", "surrogatepass"))
        for i, el in enumerate(arr):
            if el is None:
                continue
            h = h0.copy()
            h.update(b"%d" % i)
            rid = h.hexdigest()[:32]
            cols = {"_row_id": rid, "_parent_row_id": parent_id, "_event_id": event_id, "_index": i, "_event_time": et}
            types = _CHILD_TYPES.copy()
            slot = len(rows)
            rows.append(None)  # type: ignore[arg-type]  # keep a parent before its own children
            if scalar:
                walk({"value": el}, site, cols, types, rid, ctx)
            elif el:
                plan = plans.get(tuple(el))
                if plan is not None:
                    plan(el, cols, types, rid, ctx)
                else:
                    walk(el, site, cols, types, rid, ctx)
            if len(cols) > MAX_COLUMNS:
                raise FlattenError("too_many_columns", f"table {child!r}: {len(cols)} columns > {MAX_COLUMNS}")
            rows[slot] = _new_row(FlatRow, (child, rid, cols, types))


_NONE = type(None)
_new_row = tuple.__new__  # FlatRow without the namedtuple __new__ wrapper (hot path)
_CHILD_TYPES = {"_row_id": "STRING", "_parent_row_id": "STRING", "_event_id": "STRING", "_index": "INT64",
                "_event_time": "TIMESTAMP"}


def _unsupported(name: str, t: type) -> None:
    raise FlattenError("unsupported_type", f"column {name!r}: unsupported value type {t.__name__}")
