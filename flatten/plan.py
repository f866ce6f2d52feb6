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


#: Nested objects are inlined into their parent's plan (guarded by their key tuple)
#: while the generated function stays below this many lines.
_MAX_LINES = 400


def compile_plan(fl: Any, site: Any, obj: dict) -> Callable:
    """``plan(obj, cols, types, row_id, ctx)`` for objects with ``obj``'s keys at ``site``.

    Value types and nested object shapes are speculated from ``obj``.
    """
    from flatten.core import _json_col, _unsupported  # late: core imports this module

    if not obj:
        return _noop
    ns: dict[str, Any] = {
        "parse_ts": parse_timestamp, "int_value": int_value, "json_col": _json_col, "unsupported": _unsupported,
        "walk": fl._walk, "arr": fl._array, "value": fl._value,
    }
    lines = ["def plan(obj, cols, types, row_id, ctx):"]
    _emit(fl, site, obj, "obj", "v", "    ", ns, lines)
    src = "\n".join(lines) + "\n"
    exec(compile(src, f"<flatten plan {site.table or 'main'}:{site.prefix or '.'}>", "exec"), ns)
    return ns["plan"]


def _const(ns: dict, value: Any) -> str:
    name = f"C{len(ns)}"
    ns[name] = value
    return name


def _emit(fl: Any, site: Any, obj: dict, src: str, var: str, ind: str, ns: dict, lines: list) -> None:
    """Emit code flattening the object in variable ``src`` (shaped like ``obj``) at ``site``."""
    names = fl._names(site, tuple(obj))
    S = _const(ns, site)
    vs = [f"{var}{i}" for i in range(len(names))]
    lines.append(f"{ind}{', '.join(vs)}, = {src}.values()")
    detect = fl._detect
    for i, (name, sample) in enumerate(zip(names, obj.values())):
        t = type(sample)
        v, n = vs[i], repr(name)
        full = f"{site.table}__{name}" if site.table else name
        generic = f"value({v}, {n}, {S}, cols, types, row_id, ctx)"
        if t is type(None) or (fl._percol and (full in fl._ts_cols or full in fl._no_ts_cols)):
            lines.append(f"{ind}if {v} is not None: {generic}")  # rare or special: the generic path
            continue
        tn = {str: "str", int: "int", float: "float", bool: "bool", dict: "dict", list: "list"}.get(t)
        if tn is None:
            lines.append(f"{ind}{generic}")
            continue
        lines.append(f"{ind}if type({v}) is {tn}:")
        body = ind + "    "
        if t is str:
            if detect:
                lines += [
                    f"{body}if len({v}) > 9 and {v}[4] == '-' and {v}[7] == '-' and (r := parse_ts({v})) is not None:",
                    f"{body}    cols[{n}], types[{n}] = r",
                    f"{body}else:",
                    f"{body}    cols[{n}] = {v}; types[{n}] = 'STRING'",
                ]
            else:
                lines.append(f"{body}cols[{n}] = {v}; types[{n}] = 'STRING'")
        elif t is int:
            lines += [
                f"{body}if {INT64_MIN} <= {v} <= {INT64_MAX}:",
                f"{body}    cols[{n}] = {v}; types[{n}] = 'INT64'",
                f"{body}else:",
                f"{body}    cols[{n}], types[{n}] = int_value({v})",
            ]
        elif t is float:
            lines.append(f"{body}cols[{n}] = {v}; types[{n}] = 'FLOAT64'")
        elif t is bool:
            lines.append(f"{body}cols[{n}] = {v}; types[{n}] = 'BOOL'")
        elif site.deep:
            lines.append(f"{body}if {v}: cols[{n}] = json_col({v}, {n}); types[{n}] = 'JSON'")
        elif t is dict:
            sub = fl._sub(site, name)
            SUB, PL = _const(ns, sub), _const(ns, sub.plans)  # plans dict is never replaced: safe to bind
            fallback = [
                f"{body}    p = {PL}.get(tuple({v}))",
                f"{body}    if p is None: walk({v}, {SUB}, cols, types, row_id, ctx)",
                f"{body}    else: p({v}, cols, types, row_id, ctx)",
            ]
            if sample and len(lines) < _MAX_LINES:
                K = _const(ns, tuple(sample))
                lines.append(f"{body}if tuple({v}) == {K}:")
                _emit(fl, sub, sample, v, f"{v}_", body + "    ", ns, lines)
                lines.append(f"{body}elif {v}:")
            else:
                lines.append(f"{body}if {v}:")
            lines += fallback
        else:
            _emit_list(fl, site, name, sample, v, n, S, body, ns, lines)
        lines.append(f"{ind}elif {v} is not None: {generic}")


def _emit_list(fl: Any, site: Any, name: str, sample: list, v: str, n: str, S: str, ind: str, ns: dict,
               lines: list) -> None:
    """A list value: fast paths for the sample's kind (all objects / all strings), else ``arr``."""
    slow = f"arr({v}, {n}, {S}, cols, types, row_id, ctx)"
    kinds = set(map(type, sample))
    if kinds == {dict}:
        child, esite = site.arrays.get(name) or fl._array_site(site, name)
        C, E = _const(ns, child), _const(ns, esite)
        lines += [
            f"{ind}if {v}:",
            f"{ind}    if set(map(type, {v})) == DICTSET: children({v}, {C}, {E}, row_id, ctx, False)",
            f"{ind}    else: {slow}",
        ]
        ns["DICTSET"], ns["children"] = {dict}, fl._child_rows
    elif kinds == {str} and not fl._scalar_child and not fl._percol:
        ns["STRSET"] = {str}
        lines += [f"{ind}if {v}:", f"{ind}    if set(map(type, {v})) == STRSET:"]
        if fl._detect:
            lines += [
                f"{ind}        for x in {v}:",
                f"{ind}            if len(x) > 9 and x[4] == '-' and x[7] == '-':",
                f"{ind}                {slow}",
                f"{ind}                break",
                f"{ind}        else:",
                f"{ind}            cols[{n}] = {v}.copy(); types[{n}] = 'STRING[]'",
            ]
        else:
            lines.append(f"{ind}        cols[{n}] = {v}.copy(); types[{n}] = 'STRING[]'")
        lines.append(f"{ind}    else: {slow}")
    else:
        lines.append(f"{ind}if {v}: {slow}")


def _noop(obj: Any, cols: dict, types: dict, row_id: str, ctx: tuple) -> None:
    return None
