"""Test harness: run the streaming job for a contract in its own process; SIGTERM/SIGINT cancels it cleanly.

    python tests/ingest/streaming_job.py CONTRACT.yaml

Prints ``job: RUNNING`` once submitted and ``job: final state <STATE>`` on exit
(0 when the job reached CANCELLED or DONE). A separate process, like
``headwater run``: the warehouse is then read from the test process without
sharing DuckDB's in-process connection cache.
"""
from __future__ import annotations

import signal
import sys
import threading

from apache_beam.runners.runner import PipelineState

from ingest import pipeline
from ingest.contract import load_contract


def main(path: str) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    result = pipeline.run(load_contract(path), [], wait=False)
    print("job: RUNNING", flush=True)
    while not stop.wait(0.5):
        if PipelineState.is_terminal(result.state):
            print(f"job: final state {result.state}", flush=True)
            return 1
    result.cancel()
    for _ in range(60):
        if PipelineState.is_terminal(result.state):
            break
        stop.wait(0.5)
    print(f"job: final state {result.state}", flush=True)
    return 0 if result.state in (PipelineState.CANCELLED, PipelineState.DONE) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
