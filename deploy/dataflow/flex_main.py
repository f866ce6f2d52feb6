"""Entry point of the flex template (copied to /template/main.py in the worker image).

Dataflow's template launcher runs this file with the template parameters as ``--name=value`` options:
``--config`` (the contract YAML, gs:// or a path in the image) plus any Beam options. It builds the job
exactly as ``headwater deploy launch`` does and submits it without waiting (the launcher VM exits).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile


def main(argv: list[str] | None = None) -> None:
    from apache_beam.io.filesystems import FileSystems

    from deploy.dataflow.submit import submit_pipeline
    from ingest.contract import load_contract

    ap = argparse.ArgumentParser(prog="headwater-flex-template")
    ap.add_argument("--config", required=True, help="contract YAML (gs://... or a path in the image)")
    args, beam_argv = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    path = args.config
    if "://" in path:
        with FileSystems.open(path) as src, tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as dst:
            dst.write(src.read())
            path = dst.name
    submit_pipeline(load_contract(path), beam_argv)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    main()
