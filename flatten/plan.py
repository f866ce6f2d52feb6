"""Compile one object shape into a straight-line flattening function.

A *shape* is the tuple of an object's keys at one site (table, path, depth).
For a shape seen repeatedly, :func:`compile_plan` generates Python source in
which column names are constants and each value's type is *speculated* from
the object the plan was compiled on (one ``type(v) is T`` guard; any other
type takes the generic single-value path), so the per-key loop, most of the
type dispatch and the name lookups disappear. The generated function must produce exactly what
``Flattener._walk_generic`` produces for the same object (a test checks this
on random documents); anything unusual (per-column timestamp overrides,
unsupported types) is delegated to the same helpers the generic path uses.

Only names produced by :mod:`flatten.names` (``[a-z0-9_]``) are embedded in
source, via ``repr``, so no input text can inject code.
"""
from __future__ import annotations

from typing import Any, Callable

from flatten.infer import INT64_MAX, INT64_MIN, int_value, parse_timestamp

__all__ = ["compile_plan"]


def compile_plan(fl: Any, site: Any, names: list[str], vtypes: tuple[type, ...]) -> Callable:
    """``plan(obj, cols, types, row_id, ctx)`` for objects with these names/value types at ``site``."""
    from flatten.core import _json_col, _unsupported  # late: core imports this module

    ns: dict[str, Any] = {
        "parse_ts": parse_timestamp, "int_value": int_value, "json_col": _json_col, "unsupported": _unsupported,
        "walk": fl._walk, "arr": fl._array, "value": fl._value, "SITE": site, "TABLE": site.table,
    }
    detect = fl._detect
    lines = ["def plan(obj, cols, types, row_id, ctx):"]
    if not names:
        return _noop
    vs = ", ".join(f"v{i}" for i in range(len(names)))
    lines.append(f"    {vs}, = obj.values()")
    for i, (name, t) in enumerate(zip(names, vtypes)):
        v, n = f"v{i}", repr(name)
        full = f"{site.table}__{name}" if site.table else name
        if t is type(None) or (fl._percol and (full in fl._ts_cols or full in fl._no_ts_cols)):
            # rare or special: the generic single-value path
            lines.append(f"    if {v} is not None: value({v}, {n}, SITE, cols, types, row_id, ctx)")
            continue
        tn = {str: "str", int: "int", float: "float", bool: "bool", dict: "dict", list: "list"}.get(t)
        if tn is None:
            lines.append(f"    value({v}, {n}, SITE, cols, types, row_id, ctx)")
            continue
        lines.append(f"    if type({v}) is {tn}:")
        if t is str:
            if detect:
                lines += [
                    f"        if len({v}) > 9 and {v}[4] == '-' and {v}[7] == '-' and (r := parse_ts({v})) is not None:",
                    f"            cols[{n}], types[{n}] = r",
                    "        else:",
                    f"            cols[{n}] = {v}; types[{n}] = 'STRING'",
                ]
            else:
                lines.append(f"        cols[{n}] = {v}; types[{n}] = 'STRING'")
        elif t is int:
            lines += [
                f"        if {INT64_MIN} <= {v} <= {INT64_MAX}:",
                f"            cols[{n}] = {v}; types[{n}] = 'INT64'",
                "        else:",
                f"            cols[{n}], types[{n}] = int_value({v})",
            ]
        elif t is float:
            lines.append(f"        cols[{n}] = {v}; types[{n}] = 'FLOAT64'")
        elif t is bool:
            lines.append(f"        cols[{n}] = {v}; types[{n}] = 'BOOL'")
        elif site.deep:
            lines.append(f"        if {v}: cols[{n}] = json_col({v}, {n}); types[{n}] = 'JSON'")
        elif t is dict:
            sub = ns[f"SUB{i}"] = fl._sub(site, name)
            ns[f"PLANS{i}"] = sub.plans  # never replaced, only grows: safe to bind
            lines += [
                f"        if {v}:",
                f"            p = PLANS{i}.get(tuple({v}))",
                f"            if p is None: walk({v}, SUB{i}, cols, types, row_id, ctx)",
                f"            else: p({v}, cols, types, row_id, ctx)",
            ]
        else:
            lines.append(f"        if {v}: arr({v}, {n}, SITE, cols, types, row_id, ctx)")
        lines.append(f"    elif {v} is not None: value({v}, {n}, SITE, cols, types, row_id, ctx)")
    src = "\n".join(lines) + "\n"
    exec(compile(src, f"<flatten plan {site.table or 'main'}:{site.prefix or '.'}>", "exec"), ns)
    return ns["plan"]


def _noop(obj: Any, cols: dict, types: dict, row_id: str, ctx: tuple) -> None:
    return None
