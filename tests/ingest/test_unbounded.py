"""BackgroundLoop (the commit / ack loops of the live sources): a step that never returns does not
stop every later commit, and the stop commits what is durable even then.

The hang is produced by the step itself (an Event nobody sets): no server can be made to hold a
client call forever on demand, and what is tested here is the loop's own supervision. The Kafka
committer's behaviour through a real broker outage is tests/ingest/test_exactly_once.py's.
"""
from __future__ import annotations

import logging
import threading
import time

import pytest

from ingest import unbounded
from ingest.unbounded import BackgroundLoop, stop_loops


class _Owner:
    """Counts steps; the first ``hang`` owners made block forever in their first step."""

    made = 0

    def __init__(self, hang: int, release: threading.Event, steps: list):
        _Owner.made += 1
        self.id = _Owner.made
        self._hang = self.id <= hang
        self._release = release
        self._steps = steps
        self.closed = False

    def step(self) -> None:
        if self._hang:
            self._release.wait()
        self._steps.append(self.id)

    def pending(self) -> str:
        return f"owner {self.id}"

    def uncommitted(self) -> bool:
        return self.id not in self._steps  # its step never returned

    def close(self) -> None:
        self.closed = True


def _wait(cond, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(unbounded, "LOOP_STUCK_S", 0.5)
    monkeypatch.setattr(unbounded, "LOOP_FINAL_STEP_S", 2.0)
    monkeypatch.setattr(unbounded, "LOOP_JOIN_S", 0.5)
    _Owner.made = 0
    release = threading.Event()
    yield release
    release.set()
    stop_loops(final=False)


def test_a_stuck_step_is_replaced_by_a_fresh_loop_with_a_fresh_owner(fast, caplog):
    steps: list[int] = []
    name = "test-stuck"
    first = BackgroundLoop.ensure(name, lambda: _Owner(1, fast, steps), 0.05)
    assert first.id == 1
    time.sleep(0.8)  # owner 1 is blocked in its first step for longer than LOOP_STUCK_S
    assert steps == []
    with caplog.at_level(logging.WARNING, logger="ingest.unbounded"):
        second = BackgroundLoop.ensure(name, lambda: _Owner(1, fast, steps), 0.05)
    assert second.id == 2, "a stuck loop must be replaced, with a new owner (new clients)"
    assert "has not returned" in caplog.text and "owner 1" in caplog.text
    assert _wait(lambda: steps.count(2) >= 3), steps
    # the same, not stuck, loop is kept
    assert BackgroundLoop.ensure(name, lambda: _Owner(1, fast, steps), 0.05) is second
    fast.set()  # the abandoned call returns: its thread ends without another step
    assert _wait(lambda: 1 in steps)
    n1 = steps.count(1)
    time.sleep(0.3)
    assert steps.count(1) == n1 == 1


def test_a_slow_step_is_not_replaced(fast):
    steps: list[int] = []
    owner = BackgroundLoop.ensure("test-healthy", lambda: _Owner(0, fast, steps), 0.05)
    assert _wait(lambda: len(steps) >= 3)
    assert BackgroundLoop.ensure("test-healthy", lambda: _Owner(0, fast, steps), 0.05) is owner


def test_stop_runs_the_final_step_with_a_fresh_owner_when_the_loop_is_stuck(fast, caplog):
    steps: list[int] = []
    BackgroundLoop.ensure("test-stop-stuck", lambda: _Owner(1, fast, steps), 0.05)
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="ingest.unbounded"):
        stop_loops(final=True)  # the join gives up after LOOP_JOIN_S
    # owner 1 is still blocked; the final step ran on owner 2
    assert 2 in steps and 1 not in steps, steps
    assert "at stop" in caplog.text
    # what is left is judged by the owner that committed (2), not the stuck one
    assert "stopped with work not committed" not in caplog.text


def test_stop_says_what_was_left_uncommitted(fast, caplog):
    class Failing(_Owner):
        def step(self):
            raise ConnectionError("broker down")

        def uncommitted(self):
            return True

    BackgroundLoop.ensure("test-stop-failing", lambda: Failing(0, fast, []), 0.05)
    time.sleep(0.2)
    with caplog.at_level(logging.WARNING, logger="ingest.unbounded"):
        stop_loops(final=True)
    assert "stopped with work not committed" in caplog.text and "owner 1" in caplog.text
