"""flatten.jsonio: integers beyond what orjson reads exactly stay exact ints."""
from __future__ import annotations

import json

import orjson
from hypothesis import given, settings, strategies as st

from flatten import jsonio


def test_integers_just_past_the_64_bit_range_stay_exact():
    for n in (-(2**63) - 1, -9999999999999999999, -(10**19), 2**64, -(2**70), 2**70):
        doc = jsonio.loads(json.dumps({"b": n}).encode())
        assert type(doc["b"]) is int and doc["b"] == n, n
    # inside the range: orjson's reading, ints
    for n in (-(2**63), 2**64 - 1, -1234567890123456789):
        assert jsonio.loads(orjson.dumps({"b": n})) == {"b": n}


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**80), 2**80))
def test_any_integer_reads_back_exactly(n):
    text = json.dumps([n, {"x": n}]).encode()
    assert jsonio.loads(text) == [n, {"x": n}]
    assert type(jsonio.loads(text)[0]) is int
