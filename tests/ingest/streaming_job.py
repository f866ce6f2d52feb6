"""Test harness: run the streaming job for a contract in its own process, like `headwater run`.

    python tests/ingest/streaming_job.py CONTRACT.yaml

Prints ``job: RUNNING`` once submitted and ``job: final state <STATE>`` on exit
(0 when the job reached CANCELLED or DONE). SIGTERM/SIGINT cancel it cleanly
(``ingest.pipeline.run_until_stopped``, the code path of `headwater run`).
"""
from __future__ import annotations

import sys

from deploy.cli import exit_after_streaming
from ingest import pipeline
from ingest.contract import load_contract


def main(path: str) -> int:
    state = pipeline.run_until_stopped(load_contract(path), [], on_running=lambda: print("job: RUNNING", flush=True))
    print(f"job: final state {state}", flush=True)
    return 0 if state in ("CANCELLED", "DONE") else 1


if __name__ == "__main__":
    exit_after_streaming(main(sys.argv[1]))
