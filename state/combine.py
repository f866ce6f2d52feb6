"""Bounded aggregates as a combine: partial accumulators, lifted merges, one final row per (key, window).

Pure (no Beam). ``state/bounded.py`` wraps these in a ``CombineFn``. The specification stays
``state/aggregate.py``: for a bounded input (nothing is late: the watermark is at -inf until every
event is in) the fold ``step`` over a key's events then ``expire`` at the key's TTL deadline gives
final rows whose values, as of ``W = ttl_at = ceil_ms(max event time + ttl)``, depend only on

* the lifetime accumulators of every accepted event, and
* the bucket accumulators of the buckets the final sliding windows cover
  (``[ceil_b(W) - N, ceil_b(W))``),

and every metric's ``add``/``merge`` in ``state/metrics.py`` is associative and order-independent.
So a key's events can be folded in any order and in pieces (partials) that are merged later, with
buckets older than ``ceil_b(W) - longest window`` dropped as soon as a later event proves them
unreachable (``W`` only grows with the key's latest event time). The result equals the fold's final
rows (``tests/state/test_combine.py`` checks values, as-of time and versions against ``step`` +
``expire`` on random inputs); the close panes the fold also emitted (one per bucket boundary) are not
produced: a backfill writes one final row per (key, window).

A partial is a plain list ``[max_event_us, lifetime_accs, {bucket_start_us: accs}]`` (Beam encodes it
with its fast primitives coder; nothing here depends on ``AggState``'s layout).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from state import aggregate as A
from state import metrics as M

__all__ = ["new_partial", "add_event", "adder", "merge_partials", "final_rows", "final_as_of", "conflicts", "Partial"]

Partial = list  # [max_event_us: int, lifetime: list[acc], buckets: dict[int, list[acc]]]


def _ceil(t: int, g: int) -> int:
    return -((-t) // g) * g


def final_as_of(plan: A.Plan, max_event_us: int) -> int:
    """As-of time ``W`` of a key's final rows: its TTL deadline (``aggregate.step`` rounds it to a whole ms)."""
    return _ceil(max_event_us + plan.ttl_us, 1000)


def _keep_from(plan: A.Plan, max_event_us: int) -> int:
    """Oldest bucket start a final row can still read, given the key's latest event time so far."""
    assert plan.bucket_us is not None
    return _ceil(final_as_of(plan, max_event_us), plan.bucket_us) - plan.max_window_us


def new_partial(plan: A.Plan) -> Partial:
    return [A.MIN_US, [M.new_acc(f) for f in plan.fns], {}]


def _prune(p: Partial, plan: A.Plan) -> None:
    low = _keep_from(plan, p[0])
    buckets = p[2]
    for b in [b for b in buckets if b < low]:
        del buckets[b]


def add_event(p: Partial, t_us: int, event_id: str, values: Mapping[str, Any], plan: A.Plan) -> list[A.Rejection]:
    """Fold one event into ``p`` (in place). Returns the metrics it could not apply (``type_conflict``),
    worded as ``aggregate.step`` words them; the rest of the event is applied."""
    if t_us > p[0]:
        p[0] = t_us
    bucket = None
    g = plan.bucket_us
    if g is not None:
        b = t_us - t_us % g
        buckets = p[2]
        bucket = buckets.get(b)
        if bucket is None:
            if b < _keep_from(plan, p[0]):
                bucket = None  # no final window reaches it: lifetime only
            else:
                bucket = buckets[b] = [M.new_acc(f) for f in plan.fns]
                if len(buckets) * g > plan.max_window_us + 2 * g:
                    _prune(p, plan)
    rejections: list[A.Rejection] = []
    life = p[1]
    threshold, prec = plan.threshold, plan.p
    for i, (fn, col) in enumerate(zip(plan.fns, plan.columns)):
        value = values.get(col) if col else None
        try:
            life[i] = M.add(fn, life[i], value, t_us, event_id, threshold, prec)
            if bucket is not None:
                bucket[i] = M.add(fn, bucket[i], value, t_us, event_id, threshold, prec)
        except M.TypeConflict as e:
            rejections.append(A.Rejection("type_conflict", f"metric {plan.names[i]!r} column {col!r}: {e}"))
    return rejections


_NO_REJECTIONS: tuple = ()


def adder(plan: A.Plan, cols: Sequence[str]) -> Callable[[Partial, int, str, tuple], Sequence[A.Rejection]]:
    """``add_event`` compiled for one plan and one values layout: ``add(p, t_us, event_id, values)`` where
    ``values[i]`` is column ``cols[i]`` (``ingest.batch.metric_columns``: what the bounded job's dedup entries
    carry). Same partial, same rejections as ``add_event(p, t_us, event_id, dict(zip(cols, values)), plan)``
    (``tests/state/test_combine.py`` compares them on random inputs), in about half the time: the metrics
    are unrolled into one function with the common cases inline (counts, times, int sums and float sums of values below 2**53,
    min/max of numbers, latest, distinct's exact set) and ``metrics.add`` for the rest (distinct's sketch,
    anything unusual, every type conflict). The bounded fold calls this once per kept event and aggregate (bench/README.md, "Sixth pass")."""
    cols = tuple(cols)
    at = {c: i for i, c in enumerate(cols)}
    g = plan.bucket_us
    env: dict = {"_keep_from": _keep_from, "_prune": _prune, "_grow": M._grow, "_add": M.add, "_TypeConflict": M.TypeConflict,
                 "_Rejection": A.Rejection, "_NONE": _NO_REJECTIONS, "_dkey": M._dkey, "_slow": add_event, "plan": plan, "_cols": cols}
    out = ["def add(p, t_us, event_id, values):",
           f"    if len(values) != {len(cols)}:",
           "        return _slow(p, t_us, event_id, dict(zip(_cols, values)), plan)",
           "    if t_us > p[0]:",
           "        p[0] = t_us"]
    if g is not None:
        fresh = "[" + ", ".join(repr(M.new_acc(f)) for f in plan.fns) + "]"
        out += [f"    b = t_us - t_us % {g}",
                "    buckets = p[2]",
                "    bucket = buckets.get(b)",
                "    if bucket is None and b >= _keep_from(plan, p[0]):",
                f"        bucket = buckets[b] = {fresh}",
                f"        if len(buckets) * {g} > {plan.max_window_us + 2 * g}:",
                "            _prune(p, plan)"]
    else:
        out.append("    bucket = None")
    out += ["    life = p[1]", "    rej = _NONE"]

    def both(lines: list, pad: str) -> list:
        """``lines`` (on ``acc``, written back as ``ACC``) for the lifetime accumulator, then the bucket's."""
        res = [pad + ln.replace("ACC", "life[I]") for ln in lines]
        res.append(pad + "if bucket is not None:")
        res += [pad + "    " + ln.replace("ACC", "bucket[I]") for ln in lines]
        return res

    for i, (fn, col) in enumerate(zip(plan.fns, plan.columns)):
        body: list = []
        if fn == "count":
            body = both(["ACC += 1"], "    ")
        elif fn in ("first_seen", "last_seen"):
            cmp = "<" if fn == "first_seen" else ">"
            body = both(["a = ACC", f"if a is None or t_us {cmp} a:", "    ACC = t_us"], "    ")
        elif col:
            env[f"_F{i}"] = fn
            env[f"_M{i}"] = f"metric {plan.names[i]!r} column {col!r}: "

            def ref(acc: str, i: int = i) -> str:
                """metrics.add of ``v`` into ``acc``: the reference implementation."""
                return f"_add(_F{i}, {acc}, v, t_us, event_id, {plan.threshold}, {plan.p})"

            generic = ["try:",
                       f"    life[I] = {ref('life[I]')}",
                       "    if bucket is not None:",
                       f"        bucket[I] = {ref('bucket[I]')}",
                       "except _TypeConflict as e:",
                       "    if rej is _NONE:",
                       "        rej = []",
                       f"    rej.append(_Rejection('type_conflict', _M{i} + str(e)))"]
            body = [f"    v = values[{at[col]}]", "    if v is not None:"]
            finite = "v.__class__ is float and v - v == 0.0"  # v - v is nan for inf and nan
            number = f"(v.__class__ is int or ({finite}))"  # not bool (its class is bool)
            if fn in ("sum", "avg"):
                body += ["        if v.__class__ is int:"]
                body += both(["a = ACC", "a[0] += v", "a[2] += 1"], "            ")
                body += [f"        elif {finite} and -{M.BIG_FLOAT!r} < v < {M.BIG_FLOAT!r}:"]
                body += both(["a = ACC", "a[1] = _grow(a[1], v)", "a[2] += 1"], "            ")
                body += ["        else:"] + ["            " + ln for ln in generic]
            elif fn in ("min", "max"):
                cmp = "<" if fn == "min" else ">"
                body += [f"        if {number}:"]
                body += both(["a = ACC", f"if a is None or v {cmp} a:", "    ACC = v"], "            ")
                body += ["        else:"] + ["            " + ln for ln in generic]
            elif fn == "latest":
                body += both(["a = ACC", "if a is None or (t_us, event_id) > (a[0], a[1]):",
                              "    ACC = [t_us, event_id, v]"], "        ")
            elif fn == "distinct":  # the exact set inline (a new list, as metrics.add makes); the sketch via metrics.add
                body += ["        k = _dkey(v)"]
                body += both(["a = ACC", "if a[0] != 'x':", f"    ACC = {ref('a')}",
                              "elif k not in a[1]:", f"    if len(a[1]) < {plan.threshold}:", "        ACC = ['x', a[1] + [k]]",
                              "    else:", f"        ACC = {ref('a')}"], "        ")
            else:  # any metric added later: the reference implementation
                body += ["        " + ln for ln in generic]
        # else: a metric without a column reads None: metrics.add leaves its accumulator as it is
        out += [ln.replace("[I]", f"[{i}]") for ln in body]
    out.append("    return rej")
    exec(compile("\n".join(out) + "\n", f"<combine.adder {plan.names}>", "exec"), env)  # noqa: S102 - our own code
    return env["add"]


def _merge_accs(plan: A.Plan, a: list, b: list) -> list:
    return [M.merge(f, x, y, plan.threshold, plan.p) for f, x, y in zip(plan.fns, a, b)]


def merge_partials(a: Partial, b: Partial, plan: A.Plan) -> Partial:
    """The partial of the union of both inputs' events (neither input is modified)."""
    out: Partial = [max(a[0], b[0]), _merge_accs(plan, a[1], b[1]), dict(a[2])]
    buckets = out[2]
    for start, accs in b[2].items():
        mine = buckets.get(start)
        buckets[start] = accs if mine is None else _merge_accs(plan, mine, accs)
    if plan.bucket_us is not None and out[0] > A.MIN_US:
        _prune(out, plan)
    return out


def final_rows(p: Partial, plan: A.Plan) -> list[A.EmitRow]:
    """The key's final rows (``final=True``), one per window in the spec's order, as ``aggregate.expire``
    emits them at the key's TTL deadline: as of ``W``, version ``W + i`` for the i-th window."""
    w = final_as_of(plan, p[0])
    rows = []
    for i, (name, length) in enumerate(plan.windows):
        if length is None:
            accs = p[1]
        else:
            assert plan.bucket_us is not None
            end = _ceil(w, plan.bucket_us)
            start = end - length
            accs = [M.new_acc(f) for f in plan.fns]
            for b in sorted(p[2]):
                if start <= b < end:
                    accs = _merge_accs(plan, accs, p[2][b])
        vals = {n: M.result(f, a, plan.p) for n, f, a in zip(plan.names, plan.fns, accs)}
        rows.append(A.EmitRow(name, vals, w, w + i, True))
    return rows


def partial_of(events: "list[tuple[int, str, Mapping[str, Any]]]", plan: A.Plan) -> "tuple[Optional[Partial], list]":
    """Convenience for tests: fold ``(t_us, event_id, values)`` events into one partial."""
    if not events:
        return None, []
    p = new_partial(plan)
    rej = []
    for t, eid, values in events:
        rej += add_event(p, t, eid, values, plan)
    return p, rej


def conflicts(values: Mapping[str, Any], plan: A.Plan) -> list[A.Rejection]:
    """The ``type_conflict`` rejections ``add_event`` (and ``aggregate.step``) would report for ``values``,
    without folding anything: the same ``metrics.add`` check on a fresh accumulator."""
    out = []
    for name, fn, col in zip(plan.names, plan.fns, plan.columns):
        if not col or fn not in M.NUMERIC_FNS:
            continue
        value = values.get(col)
        if value is None or M.numeric(value):
            continue
        try:
            M.add(fn, M.new_acc(fn), value, 0, "", plan.threshold, plan.p)
        except M.TypeConflict as e:
            out.append(A.Rejection("type_conflict", f"metric {name!r} column {col!r}: {e}"))
    return out
