"""Metric accumulators: pure, mergeable, order-independent. No Beam import.

Every accumulator is a plain JSON-serialisable value (ints, floats, lists,
strings) so the per-key state encodes with orjson; HyperLogLog registers are
carried base64-encoded. ``add`` folds one value in, ``merge`` combines two
accumulators (used to read a sliding window out of its buckets) and
``result`` gives the output value. All three are order-independent, which is
what makes the stream and a bounded backfill agree on final values:

* sums keep an exact integer total plus Shewchuk partials for floats, so the
  float result is the correctly rounded exact sum whatever the arrival order.
  They never overflow: a float of magnitude >= 2**53 is an integer, so it goes
  into the exact integer total (the partials then only sum values below 2**53,
  which no realistic count of events can take past the float range). A total
  that the warehouse's JSON number cannot hold (an integer outside the 64-bit
  range, a float sum past +-1.8e308) is written as a JSON *string* holding its
  exact decimal digits (integers) or its value to 17 significant digits
  (floats): see :func:`result` and docs/state.md, "Sums past the number range";
* ``latest`` keeps ``(event_time_us, event_id, value)`` and the maximum wins,
  ties broken by event id;
* distinct counts keep the exact set up to ``threshold`` values, then a
  HyperLogLog (datasketch, register max-merge: the registers only depend on
  the set of values, not on their order).
"""
from __future__ import annotations

import base64
import math
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import orjson

if TYPE_CHECKING:
    from datasketch import HyperLogLog

__all__ = ["new_acc", "add", "merge", "result", "numeric", "fits", "hll_relative_error", "TypeConflict"]

NUMERIC_FNS = frozenset({"sum", "min", "max", "avg"})


class TypeConflict(ValueError):
    """A value that a metric cannot fold in (e.g. a string for 'sum'). Terminal."""


def hll_relative_error(p: int) -> float:
    """Relative standard error of a HyperLogLog with 2**p registers."""
    return 1.04 / math.sqrt(2**p)


def numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        not isinstance(value, float) or math.isfinite(value))


def new_acc(fn: str) -> Any:
    if fn == "count":
        return 0
    if fn in ("sum", "avg"):
        return [0, [], 0]  # exact int total, float partials, number of values
    if fn == "distinct":
        return ["x", []]
    return None  # min, max, first_seen, last_seen, latest


def _grow(partials: list[float], x: float) -> list[float]:
    """Shewchuk's exact float summation step (as in math.fsum's recipe)."""
    out = []
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            out.append(lo)
        x = hi
    out.append(x)
    return out


#: Floats of at least this magnitude are integers (53-bit significand): a sum adds them to its exact int total.
BIG_FLOAT = 2.0**53
#: What a JSON number in the warehouse holds (orjson writes 64-bit integers: signed, and unsigned up to 2**64-1).
INT_MIN, INT_MAX = -(2**63), 2**64 - 1


def _sum_add(acc: list, v: Any) -> None:
    if isinstance(v, int):
        acc[0] += v
    elif -BIG_FLOAT < v < BIG_FLOAT:
        acc[1] = _grow(acc[1], float(v))
    else:  # an integer-valued float: exact in the int total; the partials note that the sum is a float sum
        acc[0] += int(v)
        if not acc[1]:
            acc[1] = [0.0]


def _exact(acc: list) -> Fraction:
    return Fraction(acc[0]) + sum(map(Fraction, acc[1]), Fraction(0))


def _sum_value(acc: list) -> int | float | str:
    """The sum's output value: the exact int total (no float was added), else ``acc[0] + fsum(partials)``;
    past the range of a JSON number (:data:`INT_MIN`..:data:`INT_MAX`, a finite float) a string of the exact
    total (see :func:`wide`). A function of the accumulator's values only, so order-independent."""
    if not acc[1]:
        v = acc[0]
        return v if INT_MIN <= v <= INT_MAX else wide(Fraction(v), True)
    try:
        v = acc[0] + math.fsum(acc[1])
    except OverflowError:  # the int total alone is past the float range
        v = math.inf
    return v if math.isfinite(v) else wide(_exact(acc), False)


def _avg_value(acc: list) -> float:
    """The mean: always within the range of its values, so a float even when the sum is not one."""
    total = _sum_value(acc)
    if isinstance(total, str):
        return float(_exact(acc) / acc[2])
    return total / acc[2]


def wide(total: Fraction, integer: bool) -> str:
    """A total that no JSON number can hold, written as a string: every digit of an integer sum; a float sum
    to 17 significant digits (what tells two doubles apart), rounded half-even, e.g. ``"2.0000000000000000E+308"``."""
    if integer:
        return str(total.numerator)
    with localcontext() as ctx:
        ctx.prec = 17
        return str(Decimal(total.numerator) / Decimal(total.denominator))


def _dkey(v: Any) -> str:
    # orjson of the value: "1" (string) and 1 (number) stay distinct.
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()


def _hll_from(acc: list, p: int) -> "HyperLogLog":
    # Imported here: datasketch's package import pulls in scipy (about 3 s per worker process start),
    # and most keys never leave the exact set.
    from datasketch.hyperloglog import HyperLogLog

    if acc[0] == "h":
        reg = np.frombuffer(base64.b64decode(acc[1]), dtype=np.int8).copy()
        return HyperLogLog(p=p, reg=reg)
    h = HyperLogLog(p=p)
    for k in acc[1]:
        h.update(k.encode())
    return h


def _hll_acc(h: "HyperLogLog") -> list:
    return ["h", base64.b64encode(h.reg.tobytes()).decode()]


def add(fn: str, acc: Any, value: Any, t_us: int, event_id: str, threshold: int, p: int) -> Any:
    """Fold one event into ``acc``. ``value`` is the column value (None: column absent/null)."""
    if fn == "count":
        return acc + 1
    if fn == "first_seen":
        return t_us if acc is None else min(acc, t_us)
    if fn == "last_seen":
        return t_us if acc is None else max(acc, t_us)
    if value is None:
        return acc  # SQL semantics: nulls do not contribute
    if fn in NUMERIC_FNS and not numeric(value):
        raise TypeConflict(f"{fn} needs a number, got {type(value).__name__}")
    if fn in ("sum", "avg"):
        _sum_add(acc, value)
        acc[2] += 1
        return acc
    if fn == "min":
        return value if acc is None else min(acc, value)
    if fn == "max":
        return value if acc is None else max(acc, value)
    if fn == "latest":
        cand = [t_us, event_id, value]
        return cand if acc is None or (t_us, event_id) > (acc[0], acc[1]) else acc
    if fn == "distinct":
        k = _dkey(value)
        if acc[0] == "x":
            if k in acc[1]:
                return acc
            vals = acc[1] + [k]
            if len(vals) <= threshold:
                return ["x", vals]
            return _hll_acc(_hll_from(["x", vals], p))
        h = _hll_from(acc, p)
        h.update(k.encode())
        return _hll_acc(h)
    raise ValueError(f"unknown metric fn {fn!r}")


def merge(fn: str, a: Any, b: Any, threshold: int, p: int) -> Any:
    """Combine two accumulators of the same metric (neither is modified)."""
    if fn == "count":
        return a + b
    if fn in ("sum", "avg"):
        partials = list(a[1])
        for x in b[1]:
            partials = _grow(partials, x)
        return [a[0] + b[0], partials, a[2] + b[2]]
    if a is None:
        return b
    if b is None:
        return a
    if fn in ("min", "first_seen"):
        return min(a, b)
    if fn in ("max", "last_seen"):
        return max(a, b)
    if fn == "latest":
        return a if (a[0], a[1]) >= (b[0], b[1]) else b
    if fn == "distinct":
        if a[0] == "x" and b[0] == "x":
            vals = sorted(set(a[1]) | set(b[1]))
            if len(vals) <= threshold:
                return ["x", vals]
            return _hll_acc(_hll_from(["x", vals], p))
        h = _hll_from(a, p)
        h.merge(_hll_from(b, p))
        return _hll_acc(h)
    raise ValueError(f"unknown metric fn {fn!r}")


def result(fn: str, acc: Any, p: int) -> Optional[Any]:
    """Output value of an accumulator (count/distinct of nothing: 0; others: None)."""
    if fn == "count":
        return acc
    if fn == "sum":
        return _sum_value(acc) if acc[2] else None
    if fn == "avg":
        return _avg_value(acc) if acc[2] else None
    if fn == "distinct":
        if acc[0] == "x":
            return len(acc[1])
        return int(round(_hll_from(acc, p).count()))
    if fn == "latest":
        return None if acc is None else acc[2]
    return acc  # min, max, first_seen, last_seen


def fits(fn: str, acc: Any) -> bool:
    """Whether ``acc`` has the shape of an accumulator of ``fn`` (used to migrate positional state)."""
    if fn == "count":
        return isinstance(acc, int) and not isinstance(acc, bool)
    if fn in ("sum", "avg"):
        return isinstance(acc, list) and len(acc) == 3 and isinstance(acc[0], int) and isinstance(acc[1], list)
    if fn == "distinct":
        return isinstance(acc, list) and len(acc) == 2 and acc[0] in ("x", "h")
    if acc is None:
        return True
    if fn in ("first_seen", "last_seen"):
        return isinstance(acc, int) and not isinstance(acc, bool)
    if fn == "latest":
        return isinstance(acc, list) and len(acc) == 3 and isinstance(acc[0], int) and isinstance(acc[1], str)
    return not isinstance(acc, (list, dict))  # min, max: a scalar
