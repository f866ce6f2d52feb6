"""Live in-process counters for the operator's status line (``headwater run`` on a terminal). No Beam.

Beam metrics are the record of a job (namespace ``headwater``), but a running portable job only
reports them to its runner; the local runners execute the SDK worker in this process (Prism with
LOOPBACK, the FnApiRunner), so a DoFn can also bump a process-wide counter that a status thread
reads every few seconds. :func:`mirror` pairs the two, so the status line and the Beam metrics are
the same increments::

    self._written = live.mirror(Metrics.counter("headwater", "warehouse_rows_written"), "rows_written")
    self._written.inc(n)   # both

On remote workers (Dataflow) these stay 0 in the launching process; nothing reads them for
correctness. Lives in ``flatten`` (the lowest layer, pure Python) so sinks and state can use it.
"""
from __future__ import annotations

import threading
from typing import Any

__all__ = ["inc", "value", "snapshot", "reset", "mirror", "Mirrored"]

_lock = threading.Lock()
_counts: dict[str, int] = {}


def inc(name: str, n: int = 1) -> None:
    with _lock:
        _counts[name] = _counts.get(name, 0) + n


def value(name: str) -> int:
    return _counts.get(name, 0)


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def reset() -> None:
    with _lock:
        _counts.clear()


class Mirrored:
    """A Beam counter whose increments also go to the live counter ``name``."""

    __slots__ = ("_counter", "_name")

    def __init__(self, counter: Any, name: str):
        self._counter = counter
        self._name = name

    def inc(self, n: int = 1) -> None:
        self._counter.inc(n)
        inc(self._name, n)

    def dec(self, n: int = 1) -> None:
        self.inc(-n)


def mirror(counter: Any, name: str) -> Mirrored:
    return Mirrored(counter, name)
