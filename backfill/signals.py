"""Clean stops for bounded commands: SIGINT/SIGTERM become a :class:`Stopped` exception. No Beam.

The local batch runner runs in this process (main thread), so raising from the handler unwinds
the job; the command then prints what finished and exits 130 (SIGINT) or 143 (SIGTERM). A
remote job (Dataflow) is cancelled by the code that waits for it (``backfill.wave``).
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["Stopped", "stop_on_signals", "exit_code"]


class Stopped(BaseException):
    """SIGINT/SIGTERM during a bounded command (BaseException: Beam's runner must not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def exit_code(stop: Stopped) -> int:
    return 130 if stop.signum == signal.SIGINT else 143


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Stopped` (main thread only; elsewhere a no-op)."""
    def on_signal(signum, _frame):
        raise Stopped(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
