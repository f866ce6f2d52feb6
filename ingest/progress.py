"""In-process progress counters for people watching a local run (demo, CLI).

Beam metrics are only complete when the job ends; these are best-effort live
figures, incremented by DoFns running in this process (they stay 0 on remote
workers). Not used for correctness anywhere.
"""
from __future__ import annotations

import threading

__all__ = ["count_parsed", "count_duplicate", "parsed", "duplicates", "reset"]

_lock = threading.Lock()
_parsed = 0
_dups = 0


def count_parsed(n: int = 1) -> None:
    global _parsed
    with _lock:
        _parsed += n


def count_duplicate(n: int = 1) -> None:
    global _dups
    with _lock:
        _dups += n


def parsed() -> int:
    return _parsed


def duplicates() -> int:
    return _dups


def reset() -> None:
    global _parsed, _dups
    with _lock:
        _parsed = 0
        _dups = 0
