"""The `headwater` command.

    headwater demo                         the main job on embedded defaults (synthetic data -> ./headwater.duckdb)
    headwater run --config FILE [beam options ...]
    headwater validate --config FILE
    headwater flatten FILE.jsonl [--config FILE --partner P] [--limit N]
    headwater schema --config FILE --partner P [--table T]
    headwater publish --config FILE --partner P [--rate N] [--count M]
    headwater backfill plan --config FILE --partner P --source GLOB... [--from T] [--to T] [--mode M] [--json]
    headwater backfill run  --config FILE --partner P --source GLOB... --id ID [...] [beam options ...]
    headwater replay --config FILE [--partner P] [--reason R] [--from T --to T] [--id ID]
    headwater manifest --config FILE [--write]   step names / coders / state specs vs the checked-in manifest
    headwater verify --config FILE [--partner P] [--since T] [--json] [--repair] aggregates vs a recomputation from the rows
    headwater deploy plan|build|launch|update|drain|status ...   Dataflow (deploy/commands.py, docs/deploy.md)
    headwater audit --config FILE [--sample N] [--log FILE] [--json]   raw PII where only masked values belong
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


def _runner(beam_argv: Sequence[str]) -> str:
    """The ``--runner`` in Beam's argv (last wins), without importing Beam."""
    runner = ""
    for i, a in enumerate(beam_argv):
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
        elif a == "--runner" and i + 1 < len(beam_argv):
            runner = beam_argv[i + 1]
    return runner


def _cmd_run(args, beam_argv: list[str]) -> int:
    from ingest.preflight import preflight

    contract = _load(args.config)
    if _runner(beam_argv).endswith("DataflowRunner"):
        # `run` waits for the job and cancels it on Ctrl-C: right locally, wrong for a Dataflow job.
        print("headwater: Dataflow jobs are deployed with `headwater deploy plan|launch|update --config "
              f"{args.config} --job NAME` (detached, recorded, update-checked); see docs/deploy.md", file=sys.stderr)
        return 2
    preflight(contract)  # before Beam is even imported: a launch that cannot work fails in seconds
    from ingest import pipeline
    print(f"headwater: running {len(contract.partners)} partners "
          f"({'streaming' if contract.streaming else 'batch'}) into {contract.warehouse.kind}", file=sys.stderr)
    if not contract.streaming:  # bounded: progress on a TTY, then the reconciliation (exit 1 if it does not hold)
        from backfill.summary import run_bounded

        return run_bounded(contract, beam_argv)
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


def _backfill_spec(args):
    from backfill.spec import BackfillSpec, parse_instant_us

    return BackfillSpec(
        partner=args.partner, patterns=tuple(args.source), format=args.format, mode=args.mode,
        columns=tuple(c.strip() for c in (args.columns or "").split(",") if c.strip()),
        start_us=parse_instant_us(args.start, "--from") if args.start else None,
        end_us=parse_instant_us(args.end, "--to") if args.end else None,
        backfill_id=getattr(args, "id", None), wave_chunks=getattr(args, "wave_chunks", 8))


def _cmd_backfill(args, beam_argv: list[str]) -> int:
    contract = _load(args.config)
    try:
        spec = _backfill_spec(args)
    except ValueError as exc:  # pydantic's ValidationError included: one line per problem, naming the flag
        errs = getattr(exc, "errors", None)
        lines = [e["msg"].removeprefix("Value error, ") for e in errs()] if callable(errs) else [str(exc)]
        print("headwater: " + "\n  ".join(lines), file=sys.stderr)
        return 2
    from backfill.chunks import ChunkListingError

    stray = beam_argv if args.backfill_cmd == "plan" else [a for a in beam_argv if not a.startswith("-")]
    if stray:  # an unquoted glob expanded by the shell lands here: refuse instead of reading one file
        print(f"headwater: backfill {args.backfill_cmd}: unexpected arguments {' '.join(stray[:3])}"
              f"{' ...' if len(stray) > 3 else ''} (quote --source globs so the shell does not expand them)",
              file=sys.stderr)
        return 2
    try:
        return _backfill(args, contract, spec, beam_argv)
    except ChunkListingError as exc:
        print(f"headwater: {exc}", file=sys.stderr)
        return 2


def _backfill(args, contract, spec, beam_argv: list[str]) -> int:
    import orjson

    from backfill.planner import build_plan, render_plan

    if args.backfill_cmd == "plan":
        plan = build_plan(contract, spec, first=args.first)
        if args.json:
            sys.stdout.write(orjson.dumps(plan, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            render_plan(plan, sys.stdout)
        return 0
    from backfill.runner import run_backfill

    return run_backfill(contract, spec, beam_argv, keep_staging=args.keep_staging)


def _cmd_replay(args, beam_argv: list[str]) -> int:
    from backfill.replay import replay
    from backfill.spec import parse_instant_us

    contract = _load(args.config)
    try:
        start = parse_instant_us(args.start, "--from") if args.start else None
        end = parse_instant_us(args.end, "--to") if args.end else None
    except ValueError as exc:
        print(f"headwater: {exc}", file=sys.stderr)
        return 2
    return replay(contract, partner=args.partner, reason=args.reason, start_us=start, end_us=end,
                  replay_id=args.id, beam_argv=beam_argv)


def _cmd_manifest(args) -> int:
    from deploy.manifest import check_or_write

    return check_or_write(_load(args.config), write=args.write, path=args.manifest, out=sys.stdout)


def _cmd_verify(args) -> int:
    from deploy.verify import VerifyUsageError, WarehouseReadError, run_verify

    try:
        return run_verify(_load(args.config), args.partner, args.since, args.json, top=args.top, repair=args.repair)
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
    s.add_argument("--repair", action="store_true",
                   help="on drift, write the recomputed rows of the keys that differ or are missing, then verify again")


def _cmd_audit(args) -> int:
    from deploy.audit import run_audit

    return run_audit(_load(args.config), sample=args.sample, log=args.log, as_json=args.json, out=sys.stdout)


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
    s = sub.add_parser("backfill", help="historical backfills: plan (writes nothing), run (resumable by --id)")
    bsub = s.add_subparsers(dest="backfill_cmd", required=True)
    for name, what in (("plan", "list chunks, estimate events and partitions, say what the mode does; writes nothing"),
                       ("run", "run the backfill into staging in waves, then apply it per mode (beam options allowed)")):
        b = bsub.add_parser(name, help=what)
        b.add_argument("--config", required=True)
        b.add_argument("--partner", required=True)
        b.add_argument("--source", action="append", required=True, help="glob of chunks (local, gs://, s3://); repeatable")
        b.add_argument("--format", default="auto", choices=["auto", "jsonl", "avro"])
        b.add_argument("--from", dest="start", help="first event time included (2026-03-01 or RFC 3339)")
        b.add_argument("--to", dest="end", help="first event time excluded")
        b.add_argument("--mode", default="fill", choices=["fill", "replace", "columns"],
                       help="fill: insert absent rows; replace: partitions in [from, to) become the backfill's; "
                            "columns: set --columns on existing rows")
        b.add_argument("--columns", help="columns mode: comma-separated flattened column names")
        if name == "plan":
            b.add_argument("--json", action="store_true", help="the plan as JSON on stdout")
            b.add_argument("--first", type=int, default=10, help="chunks to list by name (default 10)")
        else:
            b.add_argument("--id", required=True, help="backfill id: rerun the same id to resume; [a-z][a-z0-9_]*")
            b.add_argument("--wave-chunks", type=int, default=8, help="chunks per Beam run, the unit of resume (default 8)")
            b.add_argument("--keep-staging", action="store_true", help="keep the staging tables after the apply")
    s = sub.add_parser("replay", help="re-run dead letters through the current contract (after a fix); rows idempotent")
    s.add_argument("--config", required=True)
    s.add_argument("--partner")
    s.add_argument("--reason", help="only dead letters with this reason, e.g. missing_user_id")
    s.add_argument("--from", dest="start", help="dead letters recorded at or after (2026-03-01 or RFC 3339)")
    s.add_argument("--to", dest="end", help="dead letters recorded before")
    s.add_argument("--id", help="replay id (default replay_<UTC time>); marks the replayed dead letters")
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
    from deploy.commands import add_deploy_parser

    add_deploy_parser(sub)
    s = sub.add_parser("audit", help="scan the warehouse, dead letters and a log for raw values of annotated fields "
                                     "(exit 1 on any hit)")
    s.add_argument("--config", required=True)
    s.add_argument("--sample", type=int, default=None, help="rows per table (default: all)")
    s.add_argument("--log", default=None, help="also scan this log file")
    s.add_argument("--json", action="store_true", help="machine-readable report")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pydantic import ValidationError

    from ingest.contract import ContractError

    ap = _parser()
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if rest and args.cmd not in ("run", "demo", "backfill", "replay", "deploy"):
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "run":
            return _cmd_run(args, rest)
        if args.cmd == "demo":
            return _cmd_demo(args, rest)
        if args.cmd == "backfill":
            return _cmd_backfill(args, rest)
        if args.cmd == "replay":
            return _cmd_replay(args, rest)
        if args.cmd == "deploy":  # Dataflow: deploy/commands.py (unknown options go to Beam)
            from deploy.commands import run_deploy

            return run_deploy(args, rest)
        return {"validate": _cmd_validate, "flatten": _cmd_flatten, "schema": _cmd_schema,
                "publish": _cmd_publish, "manifest": _cmd_manifest, "verify": _cmd_verify,
                "audit": _cmd_audit}[args.cmd](args)
    except (ContractError, ValidationError) as exc:
        print(f"headwater: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        if args.cmd != "deploy":
            raise
        print(f"headwater deploy: {exc}", file=sys.stderr)  # bad job name, missing baseline, bad mapping file
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
