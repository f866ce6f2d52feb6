"""Fixtures for ingest tests: real local servers (see tests/conftest_services.py) and a Prism runner."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

import apache_beam as beam
import orjson
import pytest

from ingest.pipeline import _end_local_job
from ingest.runner import runner_options
from sinks import ledger
from tests.conftest_services import live_services, unique_name  # noqa: F401  (fixture re-export)

_WRITE_LOCK = threading.Lock()


class AppendJsonl(beam.DoFn):
    """Test sink: one JSON line per RawMessage with its element timestamp (LOOPBACK workers share the FS).

    Like the warehouse sinks, it tells the local commit ledger (sinks.ledger) once a line is written,
    so the source commits / acks it."""

    def __init__(self, path: str):
        self._path = path

    def process(self, m, ts=beam.DoFn.TimestampParam):
        line = orjson.dumps({"coords": m.coords, "payload": m.payload.decode("utf-8", "replace"),
                             "attributes": orjson.loads(m.attributes), "source_time_us": m.source_time_us,
                             "source": m.source, "partner": m.partner, "ts_us": ts.micros})
        with _WRITE_LOCK, open(self._path, "ab") as fh:
            fh.write(line + b"\n")
        ledger.resolve(m.coords)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def pubsub_backlog(subscription: str, max_messages: int = 100, timeout: float = 3.0) -> int:
    """Messages still deliverable on ``subscription``, i.e. not acked: pulls them and nacks them at once
    (at most ``max_messages``; a pull that times out found none)."""
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    client = pubsub_v1.SubscriberClient()
    try:
        try:
            resp = client.pull(request={"subscription": subscription, "max_messages": max_messages}, timeout=timeout)
        except exceptions.DeadlineExceeded:
            return 0
        ids = [r.ack_id for r in resp.received_messages]
        if ids:
            client.modify_ack_deadline(request={"subscription": subscription, "ack_ids": ids,
                                                "ack_deadline_seconds": 0})
        return len(ids)
    finally:
        client.close()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def run_streaming(build: Callable[[beam.Pipeline], None], until: Callable[[], bool], timeout: float = 60.0,
                  argv: Optional[list[str]] = None) -> tuple[bool, str]:
    """Run a streaming pipeline on the local runner until ``until()`` or timeout; cancel it. -> (reached, final state)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.runner import PipelineState

    p = beam.Pipeline(options=PipelineOptions(runner_options(True, list(argv or []))))
    build(p)
    result = p.run()
    try:
        reached = wait_for(until, timeout)
    finally:
        try:
            result.cancel()
            # wait_until_finish() raises for CANCELLED on portable runners; poll the state instead.
            wait_for(lambda: PipelineState.is_terminal(result.state), 30)
            state = str(result.state)
        finally:
            _end_local_job()  # final commits, then no commit loop and no Prism left behind
    return reached, state


@pytest.fixture
def prism_argv() -> list[str]:
    return runner_options(True, [])
