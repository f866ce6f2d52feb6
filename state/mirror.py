"""In-process copies of a stateful step's state, for runners whose state lives in this process (issue 13).

On the local streaming runner (Prism with ``--environment_type=LOOPBACK``) every per-key state read of a
stateful DoFn is a blocking gRPC round trip to Prism, and the Python SDK caches nothing across bundles
(Prism sends no cache tokens). The live job's profile (bench/README.md "Live path") showed the bundle
threads waiting on those reads most of the time: dedup's flag and the aggregate's cell, one each per
event. Yet on that runner every write of that state comes from this process, Prism serializes the
bundles of one key, and a failed bundle fails the whole job (Prism does not retry bundles), so this
process can know what the state holds:

* :class:`KeySketch`, a Bloom filter of the keys a step has *written*: a key it does not contain has
  no state (an event id never seen, so dedup skips the read); a key it may contain is read as before.
  False positives only cost a read.
* :class:`ValueMirror`, a bounded LRU copy of the bytes last written to (or read from) each key's cell:
  a hit is the cell's value, a miss is read from the runner and remembered.

Both are per job (``job``: a token made when the pipeline is built) and shared by every instance of the
DoFn in this process. They are only correct when no other process writes the state and the state does
not outlive this process: callers enable them for Prism with LOOPBACK workers only
(``ingest.pipeline``), never on Dataflow (several workers, state kept across restarts and updates).
Pure Python, no Beam.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Optional

__all__ = ["KeySketch", "ValueMirror", "sketch_for", "mirror_for", "held", "hold", "forget", "write_new"]


class KeySketch:
    """A growing Bloom filter of strings: ``add`` then ``may_contain`` is always True; a string never
    added is reported absent except with a small probability (~0.5 % per filter while each filter holds at
    most PER_FILTER keys; a full filter is kept and a new one started, 4 MiB per 2.5M keys)."""

    BITS = 1 << 25  # per filter (4 MiB)
    PER_FILTER = 2_500_000
    _MASK = BITS - 1

    def __init__(self):
        self._filters: list[bytearray] = [bytearray(self.BITS >> 3)]
        self._count = 0
        self._lock = threading.Lock()  # adds read-modify-write bytes: two keys may share one

    @classmethod
    def _positions(cls, key: str) -> tuple[int, int, int, int]:
        d = hashlib.blake2b(key.encode(), digest_size=16).digest()
        m = cls._MASK
        return (int.from_bytes(d[0:4], "little") & m, int.from_bytes(d[4:8], "little") & m,
                int.from_bytes(d[8:12], "little") & m, int.from_bytes(d[12:16], "little") & m)

    def may_contain(self, key: str) -> bool:
        a, b, c, d = self._positions(key)
        for f in self._filters:
            if f[a >> 3] >> (a & 7) & 1 and f[b >> 3] >> (b & 7) & 1 and f[c >> 3] >> (c & 7) & 1 \
                    and f[d >> 3] >> (d & 7) & 1:
                return True
        return False

    def add(self, key: str) -> None:
        pos = self._positions(key)
        with self._lock:
            if self._count >= self.PER_FILTER * len(self._filters):
                self._filters.append(bytearray(self.BITS >> 3))
            f = self._filters[-1]
            for p in pos:
                f[p >> 3] |= 1 << (p & 7)
            self._count += 1

    def __len__(self) -> int:
        return self._count


_MISSING = object()


class ValueMirror:
    """key -> the bytes of its state cell (None: no state), the ``capacity`` most recently used keys."""

    def __init__(self, capacity: int = 200_000):
        self._capacity = capacity
        self._values: "OrderedDict[object, Optional[bytes]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=_MISSING):
        """The mirrored value (None: no state) or ``default`` (MISSING) when this key is not mirrored."""
        with self._lock:
            value = self._values.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._values.move_to_end(key)
            return value

    def put(self, key, value: Optional[bytes]) -> None:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            if len(self._values) > self._capacity:
                self._values.popitem(last=False)

    def __len__(self) -> int:
        return len(self._values)


MISSING = _MISSING


def write_new(cell, value) -> None:
    """Write ``value`` to a read-modify-write state cell known to hold nothing (a key the sketch proved
    never written). Beam's ``write`` is a clear then an append, two requests to the runner at commit; on
    an empty cell the append alone stores the same, so the clear is not sent (a third of the live job's
    state requests). Cells of other runtimes (no underlying bag) are written as usual."""
    bag = getattr(cell, "_underlying_bag_state", None)
    if bag is None or not hasattr(bag, "add"):
        cell.write(value)
    else:
        bag.add(value)
_registry: dict[tuple[str, str, str], object] = {}
_registry_lock = threading.Lock()


def sketch_for(job: str, step: str) -> KeySketch:
    """The job's KeySketch for ``step`` (one per process, shared by the DoFn's instances)."""
    with _registry_lock:
        s = _registry.get((job, step, "sketch"))
        if s is None:
            s = _registry[(job, step, "sketch")] = KeySketch()
        return s  # type: ignore[return-value]


def mirror_for(job: str, step: str) -> ValueMirror:
    with _registry_lock:
        m = _registry.get((job, step, "values"))
        if m is None:
            m = _registry[(job, step, "values")] = ValueMirror()
        return m  # type: ignore[return-value]


def held(job: str, step: str, kind: str) -> Optional[object]:
    """What the job's ``step`` keeps in this process under ``kind`` (``hold``), or None."""
    with _registry_lock:
        return _registry.get((job, step, kind))


def hold(job: str, step: str, kind: str, value: object) -> None:
    """Keep ``value`` for the job's ``step`` in this process until ``forget`` (e.g. ingest.live_batches: a
    shard's decoded state)."""
    with _registry_lock:
        _registry[(job, step, kind)] = value


def forget(job: Optional[str] = None) -> None:
    """Drop the job's sketches, mirrors and held values (every job's when None): the job ended."""
    with _registry_lock:
        for k in [k for k in _registry if job is None or k[0] == job]:
            del _registry[k]
