"""Pieces shared by headwater's unbounded splittable-DoFn sources (Kafka, Pub/Sub pull)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import WatermarkEstimatorProvider
from apache_beam.utils.timestamp import Timestamp

__all__ = ["ManualWatermarks", "advance_watermark", "run_later", "nothing", "BackgroundLoop", "stop_loops"]

_LOG = logging.getLogger(__name__)


class ManualWatermarks(WatermarkEstimatorProvider):
    """A manual watermark estimator per restriction; the DoFn advances it from element timestamps."""

    def initial_estimator_state(self, element, restriction):
        return None

    def create_watermark_estimator(self, estimator_state):
        return ManualWatermarkEstimator(estimator_state)


def advance_watermark(estimator: ManualWatermarkEstimator, ts: Timestamp) -> None:
    """Move the watermark forward to ``ts``; never backwards."""
    current = estimator.current_watermark()
    if current is None or ts > current:
        estimator.set_watermark(ts)


def nothing() -> None:
    """A finalization callback with nothing to commit or ack."""
    return None


def run_later(delay_s: float, action: Callable[[], None]) -> None:
    """Run ``action`` after ``delay_s`` on a daemon timer. A killed job never runs it, so the
    source replays (Kafka) or the broker redelivers (Pub/Sub): duplicates, which dedup removes, never loss."""
    timer = threading.Timer(delay_s, action)
    timer.daemon = True
    timer.start()


#: Backoff bounds of a failing background loop (commit / ack): retried forever, at most this far apart.
LOOP_BACKOFF_MIN_S = 0.5
LOOP_BACKOFF_MAX_S = 5.0

_loops: dict[str, "BackgroundLoop"] = {}
_loops_lock = threading.Lock()


class BackgroundLoop:
    """A daemon thread calling ``step()`` every ``interval_s`` (commit / ack loops of the sources).

    ``step`` raising is an outage: retried with a bounded backoff, logged once when it starts
    (with ``pending()``: what is waiting) and once when it ends; never an unhandled traceback.
    Committing later is always safe (a replay is dropped as a duplicate), so no failure is fatal.
    One loop per ``name`` in the process (:meth:`ensure`); :func:`stop_loops` ends them all,
    each running ``step`` once more so what became durable before the stop is committed.
    """

    def __init__(self, name: str, step: Callable[[], None], pending: Callable[[], str], interval_s: float = 0.5):
        self.name = name
        self._step = step
        self._pending = pending
        self._interval = interval_s
        self._stop = threading.Event()
        self._outage_since: Optional[float] = None
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name=f"headwater-{name}", daemon=True)

    @classmethod
    def ensure(cls, name: str, step: Callable[[], None], pending: Callable[[], str],
               interval_s: float = 0.5) -> "BackgroundLoop":
        with _loops_lock:
            loop = _loops.get(name)
            if loop is None or not loop._thread.is_alive():
                loop = _loops[name] = cls(name, step, pending, interval_s)
                loop._thread.start()
            return loop

    def _once(self) -> bool:
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - an outage of the broker/emulator: logged once, retried
            self._failures += 1
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                try:
                    what = self._pending()
                except Exception:  # noqa: BLE001
                    what = "?"
                _LOG.warning("headwater %s: failing (%s: %s); retrying every <= %.0fs; pending: %s",
                             self.name, type(exc).__name__, str(exc)[:300], LOOP_BACKOFF_MAX_S, what)
            return False
        if self._outage_since is not None:
            _LOG.warning("headwater %s: recovered after %.1fs (%d failed attempts)", self.name,
                         time.monotonic() - self._outage_since, self._failures)
            self._outage_since = None
            self._failures = 0
        return True

    def _run(self) -> None:
        delay = self._interval
        while not self._stop.wait(delay):
            if self._once():
                delay = self._interval
            else:
                delay = min(LOOP_BACKOFF_MAX_S, max(LOOP_BACKOFF_MIN_S, delay * 2))

    def stop(self, final: bool = True, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if final and not self._thread.is_alive():
            self._once()


def stop_loops(final: bool = True) -> None:
    """Stop every background loop of this process (the job ended); ``final`` runs each step once more."""
    with _loops_lock:
        loops = list(_loops.values())
        _loops.clear()
    for loop in loops:
        loop.stop(final=final)
