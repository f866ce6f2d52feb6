"""The `headwater` command.

    headwater demo                         the main job on embedded defaults (synthetic data -> ./headwater.duckdb)
    headwater run --config FILE [beam options ...]
    headwater validate --config FILE
    headwater flatten FILE.jsonl [--config FILE --partner P] [--limit N]
    headwater schema --config FILE --partner P [--table T]
    headwater publish --config FILE --partner P [--rate N] [--count M]
    headwater backfill --config FILE --partner P --source GLOB [--source GLOB ...] [beam options ...]
    headwater manifest --config FILE [--write]   step names / coders / state specs vs the checked-in manifest
    headwater verify --config FILE [--partner P] [--since T] [--json]   aggregates vs a recomputation from the rows
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "exit_after_streaming"]


def exit_after_streaming(code: int) -> None:
    """Exit without interpreter teardown once a streaming job has ended.

    After a cancelled portable (Prism) job, Beam's gRPC worker threads are still
    being torn down; normal interpreter shutdown then aborts in native code
    ("terminate called without an active exception", SIGABRT) although the job
    ended cleanly and every write was flushed. Output is flushed first.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _load(path: str):
    from ingest.contract import load_contract

    return load_contract(path)


def _cmd_validate(args) -> int:
    from ingest.preflight import preflight

    contract = _load(args.config)
    preflight(contract, create_subscriptions=False)  # validate changes nothing; `run` creates a missing emulator subscription
    for p in contract.partners:
        kinds = ", ".join(s.kind for s in p.sources)
        print(f"partner {p.name}: sources [{kinds}], table {p.table.name} "
              f"(partition {p.table.partition_column}/{p.table.partition_granularity}, cluster {list(p.table.clustering)}), "
              f"{len(p.columns)} annotated columns, {len(p.aggregates)} aggregates")
    print(f"contract {args.config}: OK ({len(contract.partners)} partners, "
          f"{'streaming' if contract.streaming else 'batch'}, warehouse {contract.warehouse.kind})")
    return 0


def _cmd_run(args, beam_argv: list[str]) -> int:
    from ingest.preflight import preflight

    contract = _load(args.config)
    preflight(contract)  # before Beam is even imported: a launch that cannot work fails in seconds
    from ingest import pipeline
    print(f"headwater: running {len(contract.partners)} partners "
          f"({'streaming' if contract.streaming else 'batch'}) into {contract.warehouse.kind}", file=sys.stderr)
    status = _start_status(contract, args.status_every)
    try:
        state = pipeline.run_until_stopped(contract, beam_argv)
    finally:
        if status is not None:
            status.stop()
    print(f"headwater: job finished in state {state}", file=sys.stderr)
    code = 0 if state in ("DONE", "CANCELLED") else 1
    if contract.streaming:
        exit_after_streaming(code)
    return code


def _start_status(contract, every_s: float):
    """The live status line of a streaming run, on a terminal only (deploy/status.py); None otherwise."""
    if not contract.streaming or every_s <= 0 or not sys.stdout.isatty():
        return None
    from deploy.status import KafkaLag, StatusLine

    lag = KafkaLag(contract)
    line = StatusLine(every_s, kafka_lag=lag if lag else None)
    return line if line.start() else None


def _cmd_demo(args, beam_argv: list[str]) -> int:
    from deploy.demo import run_demo

    figures = run_demo(Path("."), events_per_partner=args.events, beam_argv=tuple(beam_argv))
    return 0 if figures.get("reconciled") else 1


def _cmd_flatten(args) -> int:
    from deploy.preview import preview

    return preview(args.file, config=args.config, partner=args.partner, limit=args.limit, out=sys.stdout)


def _cmd_schema(args) -> int:
    from deploy.preview import show_schema

    return show_schema(_load(args.config), args.partner, args.table, out=sys.stdout)


def _cmd_publish(args) -> int:
    from deploy.publish import publish

    contract = _load(args.config)
    sent = publish(contract, args.partner, rate=args.rate, count=args.count, seed=args.seed)
    print(f"published {sent} events for partner {args.partner}")
    return 0


def _cmd_backfill(args, beam_argv: list[str]) -> int:
    from backfill.plan import BackfillPlan, backfill_contract
    from ingest import pipeline
    from ingest.preflight import preflight

    contract = _load(args.config)
    plan = BackfillPlan(partner=args.partner, patterns=tuple(args.source), format=args.format,
                        warehouse_path=args.warehouse_path)
    bf = backfill_contract(contract, plan)
    preflight(bf)
    print(f"headwater: backfill of {plan.partner} from {', '.join(plan.patterns)} into {bf.warehouse.kind}",
          file=sys.stderr)
    state = pipeline.run_until_stopped(bf, beam_argv)
    print(f"headwater: backfill finished in state {state}", file=sys.stderr)
    return 0 if state.endswith("DONE") else 1


def _cmd_manifest(args) -> int:
    from deploy.manifest import check_or_write

    return check_or_write(_load(args.config), write=args.write, path=args.manifest, out=sys.stdout)


def _cmd_verify(args) -> int:
    from deploy.verify import VerifyUsageError, WarehouseReadError, run_verify

    try:
        return run_verify(_load(args.config), args.partner, args.since, args.json, top=args.top)
    except (VerifyUsageError, WarehouseReadError) as exc:
        print(f"headwater verify: {exc}", file=sys.stderr)
        return 2


def _add_verify(sub) -> None:
    s = sub.add_parser("verify", help="recompute aggregates from the warehouse rows and compare (exit 1 on drift)")
    s.add_argument("--config", required=True)
    s.add_argument("--partner", help="only this partner")
    s.add_argument("--since", help="only keys with events since T (ISO-8601 time, or a duration back from now: 6h, 2d)")
    s.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    s.add_argument("--top", type=int, default=5, help="largest differences listed per aggregate (default 5)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="headwater", description="Streaming-first event ingestion on Apache Beam.")
    ap.add_argument("-v", "--verbose", action="store_true", help="INFO logging (Beam's included)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("demo", help="run the main job on embedded defaults (synthetic events -> ./headwater.duckdb)")
    s.add_argument("--events", type=int, default=10_000, help="events per partner (default 10000)")
    s = sub.add_parser("run", help="run the pipeline for a contract; unknown options go to Beam")
    s.add_argument("--config", required=True)
    s.add_argument("--status-every", type=float, default=10.0, metavar="SECONDS",
                   help="streaming, on a terminal: a status line every N seconds (0: off; default 10)")
    s = sub.add_parser("backfill", help="bounded historical run of one partner from file globs (same transforms)")
    s.add_argument("--config", required=True)
    s.add_argument("--partner", required=True)
    s.add_argument("--source", action="append", required=True, help="glob of chunks (local, gs://, s3://); repeatable")
    s.add_argument("--format", default="auto", choices=["auto", "jsonl", "avro"])
    s.add_argument("--warehouse-path", default=None, help="duckdb: write into this file instead")
    s = sub.add_parser("validate", help="validate a contract (fails naming the partner and field)")
    s.add_argument("--config", required=True)
    s = sub.add_parser("flatten", help="preview the rows a file's events become")
    s.add_argument("file")
    s.add_argument("--config")
    s.add_argument("--partner")
    s.add_argument("--limit", type=int, default=20, help="events to show (default 20; 0 = all)")
    s = sub.add_parser("schema", help="show a partner's table schemas and their versions")
    s.add_argument("--config", required=True)
    s.add_argument("--partner", required=True)
    s.add_argument("--table")
    s = sub.add_parser("publish", help="publish realistic events to a partner's Pub/Sub topic or Kafka topic")
    s.add_argument("--config", required=True)
    s.add_argument("--partner", required=True)
    s.add_argument("--rate", type=float, default=100.0, help="events per second")
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("manifest", help="compare the job's step manifest with the checked-in one (or --write it)")
    s.add_argument("--config", required=True)
    s.add_argument("--manifest", default=None, help="manifest path (default deploy/manifest/steps.json)")
    s.add_argument("--write", action="store_true")
    _add_verify(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pydantic import ValidationError

    from ingest.contract import ContractError

    ap = _parser()
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if rest and args.cmd not in ("run", "demo", "backfill"):
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "run":
            return _cmd_run(args, rest)
        if args.cmd == "demo":
            return _cmd_demo(args, rest)
        if args.cmd == "backfill":
            return _cmd_backfill(args, rest)
        return {"validate": _cmd_validate, "flatten": _cmd_flatten, "schema": _cmd_schema,
                "publish": _cmd_publish, "manifest": _cmd_manifest, "verify": _cmd_verify}[args.cmd](args)
    except (ContractError, ValidationError) as exc:
        print(f"headwater: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - known launch errors get one clean line, not a traceback
        if type(exc).__name__ in ("PrismNotFound", "MaskKeyError"):
            print(f"headwater: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("headwater: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
