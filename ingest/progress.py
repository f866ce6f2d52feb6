"""In-process progress counters for people watching a local run (demo, CLI).

Beam metrics are only complete when the job ends; these are best-effort live
figures, incremented by DoFns running in this process (they stay 0 on remote
workers). Not used for correctness anywhere. Stored in :mod:`flatten.live`
with the sinks' and the aggregate step's live counters (``headwater run``'s status line).
"""
from __future__ import annotations

from flatten import live

__all__ = ["count_parsed", "count_duplicate", "parsed", "duplicates", "reset"]

EVENTS_IN = "events_in"
DUPLICATES = "duplicates"


def count_parsed(n: int = 1) -> None:
    live.inc(EVENTS_IN, n)


def count_duplicate(n: int = 1) -> None:
    live.inc(DUPLICATES, n)


def parsed() -> int:
    return live.value(EVENTS_IN)


def duplicates() -> int:
    return live.value(DUPLICATES)


def reset() -> None:
    live.reset()
