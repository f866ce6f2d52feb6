"""Column-name normalisation: legal BigQuery identifiers, deterministic collisions."""
import re

import pytest

from flatten.names import MAX_NAME, join_name, normalize_key, resolve_keys

LEGAL = re.compile(r"^[a-z][a-z0-9_]*$")


@pytest.mark.parametrize("key,expected", [
    ("userName", "username"),
    ("user_name", "user_name"),
    ("User Name", "user_name"),
    ("a.b", "a_b"),
    ("a__b", "a_b"),
    ("_PARTITIONTIME", "partitiontime"),
    ("_TABLE_SUFFIX", "table_suffix"),
    ("__ROOT__", "root"),
    ("_event_id", "event_id"),
    ("1st", "n_1st"),
    ("2", "n_2"),
    ("", "empty"),
    ("___", "empty"),
    ("!!", "empty"),
    ("Émile", "emile"),
    ("名前", "u540d_u524d"),
    ("ß", "u00df"),
    ("v_string", "k_v_string"),
    ("v_int64_repeated", "k_v_int64_repeated"),
])
def test_normalize_key(key, expected):
    assert normalize_key(key) == expected
    assert LEGAL.match(normalize_key(key))


def test_segments_never_start_or_end_with_underscore_nor_contain_separator():
    for k in ["_x", "x_", "a  b", "-a-", "a__b__c", "\u0000", "😀", " "]:
        n = normalize_key(k)
        assert not n.startswith("_") and not n.endswith("_") and "__" not in n


def test_collisions_resolved_independent_of_order():
    keys = ("User Name", "user_name", "USER-NAME")
    a = dict(zip(keys, resolve_keys(keys)))
    rev = tuple(reversed(keys))
    b = dict(zip(rev, resolve_keys(rev)))
    assert a == b
    assert a["user_name"] == "user_name"  # the key already in normal form wins
    assert len(set(a.values())) == 3
    assert all(v.startswith("user_name_") for k, v in a.items() if k != "user_name")


def test_collision_without_exact_key_smallest_raw_key_wins():
    keys = ("b", "B ")
    assert resolve_keys(keys)[0] == "b"
    keys = ("A", "a ")
    names = resolve_keys(keys)
    assert names[0] == "a"  # "A" < "a " in code-point order
    assert names[1].startswith("a_") and len(names[1]) == 10


def test_lone_key_keeps_plain_name():
    assert resolve_keys(("User Name",)) == ["user_name"]


def test_long_names_truncated_deterministically():
    long = "x" * 500
    n = join_name("p", long)
    assert len(n) <= MAX_NAME and LEGAL.match(n)
    assert n == join_name("p", long)
    assert join_name("p", long) != join_name("p", long + "y")


def test_join():
    assert join_name("", "a") == "a"
    assert join_name("a", "b") == "a__b"
