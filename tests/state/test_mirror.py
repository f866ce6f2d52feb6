"""state.mirror: the in-process copies of state the local streaming runner's stateful steps use (issue 13).

The Beam side (dedup and aggregates with the mirror on, same outputs as without) is in
tests/ingest/test_dedup.py and tests/state/test_transform_stream.py (parametrized ``mirrored``) and,
end to end on Prism through kills, tests/ingest/test_exactly_once.py.
"""
from __future__ import annotations

import threading

from state import mirror
from state.mirror import MISSING, KeySketch, ValueMirror


def test_sketch_has_no_false_negatives_and_few_false_positives():
    s = KeySketch()
    added = [f"acme\x1fevent-{i}" for i in range(200_000)]
    for k in added:
        s.add(k)
    assert all(s.may_contain(k) for k in added)
    others = [f"acme\x1fother-{i}" for i in range(50_000)]
    fp = sum(s.may_contain(k) for k in others) / len(others)
    assert fp < 0.001, fp  # 200k keys in 2^25 bits, 4 probes: ~1e-5
    assert len(s) == len(added)


class _Tiny(KeySketch):
    BITS = 1 << 12
    PER_FILTER = 300
    _MASK = BITS - 1


def test_sketch_grows_a_new_filter_instead_of_filling_one():
    s = _Tiny()
    keys = [f"k{i}" for i in range(1000)]
    for k in keys:
        s.add(k)
    assert len(s._filters) == 4  # 300 keys per filter
    assert all(s.may_contain(k) for k in keys)
    fp = sum(s.may_contain(f"x{i}") for i in range(5000)) / 5000
    assert fp < 0.2, fp


def test_sketch_adds_from_many_threads_lose_nothing():
    """Bits of different keys share bytes: concurrent adds must not overwrite each other's bits."""
    s = _Tiny()
    s.PER_FILTER = 10**9  # one small filter: maximal byte sharing

    def add(t):
        for i in range(2000):
            s.add(f"t{t}-{i}")

    threads = [threading.Thread(target=add, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(s.may_contain(f"t{t}-{i}") for t in range(8) for i in range(2000))


def test_value_mirror_hits_misses_and_evicts_least_recently_used():
    m = ValueMirror(capacity=3)
    assert m.get(("p", "a", "u1")) is MISSING
    m.put(("p", "a", "u1"), b"one")
    m.put(("p", "a", "u2"), None)  # known: no state (cleared)
    m.put(("p", "a", "u3"), b"three")
    assert m.get(("p", "a", "u2")) is None
    assert m.get(("p", "a", "u1")) == b"one"  # now most recently used
    m.put(("p", "a", "u4"), b"four")  # evicts u3, the least recently used
    assert m.get(("p", "a", "u3")) is MISSING
    assert [m.get(("p", "a", k)) for k in ("u1", "u2", "u4")] == [b"one", None, b"four"]
    assert len(m) == 3


def test_registry_is_per_job_and_step_and_forgotten_at_job_end():
    a = mirror.sketch_for("job1", "DropDuplicateEvents")
    assert mirror.sketch_for("job1", "DropDuplicateEvents") is a
    assert mirror.sketch_for("job2", "DropDuplicateEvents") is not a
    v = mirror.mirror_for("job1", "ComputeAggregates/AggregatePerKey")
    v.put("k", b"x")
    mirror.forget("job1")
    assert mirror.sketch_for("job1", "DropDuplicateEvents") is not a
    assert mirror.mirror_for("job1", "ComputeAggregates/AggregatePerKey").get("k") is MISSING
    mirror.forget()


def test_a_step_has_both_a_sketch_and_a_value_mirror():
    """The aggregate step keeps both (keys ever written, and the cells' bytes) under one step name."""
    s = mirror.sketch_for("job3", "ComputeAggregates/AggregatePerKey")
    v = mirror.mirror_for("job3", "ComputeAggregates/AggregatePerKey")
    assert isinstance(s, KeySketch) and isinstance(v, ValueMirror)
    mirror.forget("job3")


class _EmptyHandler:
    """A runner whose cells are all empty; records the requests a commit sends."""

    def __init__(self):
        self.sent = []

    def blocking_get(self, key, coder):
        self.sent.append(("get", key))
        return iter(())

    def clear(self, key):
        self.sent.append(("clear", key))
        return _Done()

    def extend(self, key, coder, elements):
        self.sent.append(("extend", key, list(elements)))
        return _Done()


class _Done:
    def get(self):
        return None


def test_write_new_stores_the_value_without_a_clear_request():
    from apache_beam.coders import BooleanCoder
    from apache_beam.runners.worker import bundle_processor as bp

    from state.mirror import write_new

    h = _EmptyHandler()
    cell = bp.ReadModifyWriteRuntimeState(bp.SynchronousBagRuntimeState(h, "k", BooleanCoder()))
    write_new(cell, True)
    assert h.sent == []  # no read, nothing sent yet
    cell.commit()
    assert h.sent == [("extend", "k", [True])]
    h.sent.clear()
    again = bp.ReadModifyWriteRuntimeState(bp.SynchronousBagRuntimeState(h, "k2", BooleanCoder()))
    write_new(again, True)
    assert again.read() is True  # read in the same bundle: the (empty) stored bag plus the new value
    again.write(False)  # a later write in the bundle is Beam's own: clear + append
    again.commit()
    assert [r[0] for r in h.sent if r[0] != "get"] == ["clear", "extend"] and h.sent[-1][2] == [False]


def test_write_new_on_another_runtime_writes_as_usual():
    from state.mirror import write_new

    class Cell:
        def __init__(self):
            self.value = None

        def write(self, v):
            self.value = v

    c = Cell()
    write_new(c, b"x")
    assert c.value == b"x"
