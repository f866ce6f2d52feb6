"""Pieces shared by headwater's unbounded splittable-DoFn sources (Kafka, Pub/Sub pull)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import WatermarkEstimatorProvider
from apache_beam.utils.timestamp import Timestamp

__all__ = ["ManualWatermarks", "advance_watermark", "nothing", "BackgroundLoop", "stop_loops"]

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


#: Backoff bounds of a failing background loop (commit / ack): retried forever, at most this far apart.
LOOP_BACKOFF_MIN_S = 0.5
LOOP_BACKOFF_MAX_S = 5.0
#: A step that has not returned after this long is stuck (every client call a step makes is bounded
#: well below it: Kafka bootstrap 30 s, commit 5 s, Pub/Sub RPCs 30 s); the loop is replaced by a
#: fresh one with fresh clients (see :meth:`BackgroundLoop.ensure`).
LOOP_STUCK_S = 60.0
#: How long :meth:`BackgroundLoop.stop` gives the final step of a stuck loop (run with fresh clients).
LOOP_FINAL_STEP_S = 35.0
#: How long :meth:`BackgroundLoop.stop` waits for the loop's thread to finish its current step.
LOOP_JOIN_S = 10.0

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
        self._busy_since: Optional[float] = None  # monotonic start of the step running now
        self._thread = threading.Thread(target=self._run, name=f"headwater-{name}", daemon=True)
        self.owner: object = None
        self._make_owner: Optional[Callable[[], object]] = None

    @classmethod
    def ensure(cls, name: str, make_owner: Callable[[], object], interval_s: float = 0.5):
        """The owner of the loop called ``name`` (one per process), made by ``make_owner()`` and
        started if there is none: an object with ``step()``, ``pending() -> str`` and optionally
        ``close()`` (called after the final step when the loop stops).

        A loop whose step has been running for ``LOOP_STUCK_S`` is replaced here (the sources call
        ``ensure`` on every read): a client call that never returns must not stop every later commit
        or ack. The stuck thread is abandoned (a daemon; it exits when its call returns) and a new
        loop starts with a new owner, so new clients. Committing or acking again from the ledger is
        always safe."""
        with _loops_lock:
            loop = _loops.get(name)
            if loop is not None and loop._thread.is_alive() and loop.stuck():
                _LOG.warning("headwater %s: a step has not returned for %.0fs; replacing the loop and its clients "
                             "(pending: %s)", name, loop.busy_for(), loop.pending_text())
                loop._stop.set()
                loop = None
            if loop is None or not loop._thread.is_alive():
                owner = make_owner()
                loop = _loops[name] = cls(name, owner.step, owner.pending, interval_s)
                loop.owner = owner
                loop._make_owner = make_owner
                loop._thread.start()
            return loop.owner

    def busy_for(self) -> float:
        """Seconds the current step has been running (0 between steps)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def stuck(self) -> bool:
        return self.busy_for() >= LOOP_STUCK_S

    def pending_text(self) -> str:
        try:
            return self._pending()
        except Exception:  # noqa: BLE001
            return "?"

    def _once(self) -> bool:
        self._busy_since = time.monotonic()
        try:
            self._step()
        except Exception as exc:  # noqa: BLE001 - an outage of the broker/emulator: logged once, retried
            self._failures += 1
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                _LOG.warning("headwater %s: failing (%s: %s); retrying every <= %.0fs; pending: %s",
                             self.name, type(exc).__name__, str(exc)[:300], LOOP_BACKOFF_MAX_S, self.pending_text())
            return False
        finally:
            self._busy_since = None
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

    def stop(self, final: bool = True, timeout_s: Optional[float] = None) -> None:
        """End the loop. ``final``: run the step once more, so what became durable is committed; if
        the loop's thread is stuck in a call, that last step runs with a fresh owner (fresh clients)
        on its own thread, given ``LOOP_FINAL_STEP_S``. Whatever is still pending afterwards is said
        in one line: nothing is left uncommitted silently."""
        self._stop.set()
        self._thread.join(LOOP_JOIN_S if timeout_s is None else timeout_s)
        ok, checked = True, self.owner
        if final and not self._thread.is_alive():
            ok = self._once()
        elif final and self._make_owner is not None:
            _LOG.warning("headwater %s: a step has not returned for %.0fs at stop; committing with fresh clients",
                         self.name, self.busy_for())
            fresh = _final_step_with_fresh_owner(self.name, self._make_owner)
            ok, checked = fresh is not None, fresh or self.owner
        close = getattr(self.owner, "close", None)
        if close is not None and not self._thread.is_alive():
            try:
                close()
            except Exception:  # noqa: BLE001 - closing a client of a server that is gone
                pass
        left = getattr(checked, "uncommitted", None)
        if not ok or (left is not None and left()):
            _LOG.warning("headwater %s: stopped with work not committed (it is redelivered and dropped as a "
                         "duplicate on the next run); pending: %s", self.name, checked.pending())


def _final_step_with_fresh_owner(name: str, make_owner: Callable[[], object]) -> Optional[object]:
    """One ``step()`` of a new owner on a daemon thread, waited for at most ``LOOP_FINAL_STEP_S``: the
    owner if its step returned (what it committed is then its state, not the stuck owner's), else None."""
    done: list[object] = []

    def run() -> None:
        owner = None
        try:
            owner = make_owner()
            owner.step()
            done.append(owner)
        except Exception as exc:  # noqa: BLE001
            _LOG.warning("headwater %s: final step failed (%s: %s)", name, type(exc).__name__, str(exc)[:300])
        finally:
            close = getattr(owner, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass

    t = threading.Thread(target=run, name=f"headwater-{name}-final", daemon=True)
    t.start()
    t.join(LOOP_FINAL_STEP_S)
    return done[0] if done else None


def stop_loops(final: bool = True) -> None:
    """Stop every background loop of this process (the job ended); ``final`` runs each step once more."""
    with _loops_lock:
        loops = list(_loops.values())
        _loops.clear()
    for loop in loops:
        loop.stop(final=final)
