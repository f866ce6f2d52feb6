"""Sums and averages past the number range: exact, order-independent, never an exception (state.metrics)."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import orjson
from hypothesis import given, settings, strategies as st

from state import aggregate as A
from state import metrics as M
from state.spec import AggregateSpec, MetricSpec

P = 12
BIG = [1e308, -1e308, 1.7976931348623157e308, -1.5e308, 2.0**53, -(2.0**60), 9.5e15, 2**63 - 1, -(2**63), 2**64 - 1]
SMALL = [0.1, -0.25, 3, -7, 1e-300, 12.5, 0, -0.0, 2**53 - 1.0]


def _fold(values, fn="sum"):
    acc = M.new_acc(fn)
    for v in values:
        acc = M.add(fn, acc, v, 0, "e", 8, P)
    return acc


def _merged(values, cut, fn="sum"):
    """Two accumulators of a split of ``values``, merged (what a window read from buckets and the bounded
    job's lifted combine do)."""
    return M.merge(fn, _fold(values[:cut], fn), _fold(values[cut:], fn), 8, P)


def _exact(values) -> Fraction:
    return sum(map(Fraction, values), Fraction(0))


def test_two_floats_near_the_top_of_the_range_sum_to_a_string_of_their_exact_total():
    acc = _fold([1e308, 1e308])
    assert M.result("sum", acc, P) == "2.0000000000000000E+308"
    assert M.result("avg", acc, P) == 1e308  # the mean is within the values' range: a float
    assert M.result("sum", _fold([-1e308, -1e308, 0.5]), P) == "-2.0000000000000000E+308"
    # back inside the range: a float again, the correctly rounded exact total
    assert M.result("sum", _fold([1e308, 1e308, -1e308, 0.5]), P) == 1e308


def test_int_sums_stay_exact_ints_while_json_can_hold_them_and_are_their_digits_beyond():
    assert M.result("sum", _fold([2**63 - 1, 2**63]), P) == 2**64 - 1  # orjson still writes it as a number
    assert M.result("sum", _fold([2**64 - 1, 1]), P) == str(2**64)
    assert M.result("sum", _fold([-(2**63), -1]), P) == str(-(2**63) - 1)
    assert M.result("avg", _fold([2**64 - 1] * 3), P) == float(2**64 - 1)
    assert isinstance(M.result("sum", _fold([2**62, 2**62]), P), int)


def test_a_big_float_keeps_the_sum_a_float_sum():
    """A float of magnitude >= 2**53 is added to the exact int total; the sum is still a float sum."""
    acc = _fold([3, 2.0**60])
    assert acc[0] == 3 + 2**60 and acc[1] == [0.0]
    assert M.result("sum", acc, P) == float(3 + 2**60) and isinstance(M.result("sum", acc, P), float)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.sampled_from(BIG + SMALL) | st.floats(allow_nan=False, allow_infinity=False)
                       | st.integers(-(2**63), 2**64 - 1), min_size=1, max_size=30),
       seed=st.integers(0, 10**6))
def test_sum_and_avg_never_raise_and_do_not_depend_on_order_or_on_merges(values, seed):
    want_sum, want_avg = M.result("sum", _fold(values), P), M.result("avg", _fold(values), P)
    shuffled = list(values)
    random.Random(seed).shuffle(shuffled)
    cut = random.Random(seed).randrange(len(values) + 1)
    for acc in (_fold(shuffled), _merged(shuffled, cut)):
        assert repr(M.result("sum", acc, P)) == repr(want_sum)
        assert repr(M.result("avg", acc, P)) == repr(want_avg)
    orjson.dumps({"sum": want_sum, "avg": want_avg})  # always writable
    exact = _exact(values)
    if isinstance(want_sum, str):  # past the range: the exact total, to 17 significant digits
        if all(isinstance(v, int) for v in values):
            assert want_sum == str(exact.numerator) and not (M.INT_MIN <= exact <= M.INT_MAX)
        else:
            assert Fraction(want_sum) == Fraction(M.wide(exact, False)) and abs(exact) > 1.7e308
    elif isinstance(want_sum, float):
        # the int total and the float partials are each exact; each is rounded once when they are added
        magnitude = sum(abs(Fraction(v)) for v in values)
        assert math.isfinite(want_sum) and abs(Fraction(want_sum) - exact) <= magnitude * Fraction(1, 2**50)
    else:
        assert want_sum == exact
    assert isinstance(want_avg, float) and math.isfinite(want_avg)


def test_a_state_holding_a_total_past_64_bits_round_trips_and_other_states_are_written_as_before():
    spec = AggregateSpec(name="a", metrics=[MetricSpec(name="s", fn="sum", column="x"),
                                            MetricSpec(name="last", fn="latest", column="x"),
                                            MetricSpec(name="n", fn="count")], windows=("lifetime", "1d"))
    plan = A.plan_for(spec)
    st_ = A._new(plan)
    st_.lifetime = [[2**70, [0.5], 3], [5, "e1", 2**63 - 1], 3]
    st_.buckets = {86_400_000_000: [[-(2**65), [], 1], [5, "e1", 7], 1], 0: [[4, [], 1], None, 1]}
    raw = st_.to_bytes()
    assert b'"wide":true' in raw
    back = A.AggState.from_bytes(raw)
    assert back == st_ and repr(back.lifetime) == repr(st_.lifetime)
    small = A._new(plan)
    small.lifetime = [[7, [0.5], 3], [5, "e1", 2], 3]
    assert b"wide" not in small.to_bytes() and A.AggState.from_bytes(small.to_bytes()) == small
