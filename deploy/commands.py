"""`headwater deploy plan | build | launch | update | drain | status` (argument parsing and wiring).

The logic lives in ``deploy.plan`` (verdict), ``deploy.dataflow.job`` (offline job build and request),
``deploy.dataflow.image`` / ``deploy.dataflow.template`` (container and flex template),
``deploy.dataflow.submit`` (talking to Dataflow) and ``deploy.dataflow.records`` (snapshots per job).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, TextIO

__all__ = ["add_deploy_parser", "run_deploy"]


def add_deploy_parser(sub) -> None:
    d = sub.add_parser("deploy", help="Dataflow: plan an update, build the container, launch, update, drain, status")
    dsub = d.add_subparsers(dest="deploy_cmd", required=True)

    def common(s, config: bool = True):
        if config:
            s.add_argument("--config", required=True)
        s.add_argument("--job", required=True, help="Dataflow job name (the key of its deploy records)")
        s.add_argument("--records", default=None, help="deploy records root (dir or gs://...; default "
                       "$HEADWATER_DEPLOY_RECORDS or ./.headwater/deploys)")
        s.add_argument("--json", action="store_true", help="machine-readable output")

    s = dsub.add_parser("plan", help="build the job offline and give the update verdict against its baseline")
    common(s)
    s.add_argument("--baseline", default=None, help="snapshot file or gs://... (default: the job's last deploy record)")
    s.add_argument("--save-job", default=None, help="write the Dataflow job request JSON here")
    s.add_argument("--write-baseline", default=None, help="write this build's snapshot here (no deploy)")
    s.add_argument("--mapping", default=None, help="rename map (default deploy/manifest/name_mapping.json)")
    s.add_argument("--image", default=None, help="worker image (default: headwater deploy build's tag)")
    s.add_argument("--job-id", default=None, help="id of the running job (replaceJobId; default: from the record)")

    s = dsub.add_parser("build", help="write the flex template spec and print the worker image tag and build command")
    s.add_argument("--config", required=True)
    s.add_argument("--project", required=True)
    s.add_argument("--region", default=None)
    s.add_argument("--repository", default="headwater", help="Artifact Registry repository")
    s.add_argument("--out", default="deploy/dataflow/build", help="directory for the template spec")
    s.add_argument("--template-gcs", default=None, help="where the spec will be uploaded (gs://...)")

    for verb, what in (("launch", "launch the job as a new Dataflow job (detaches after submission)"),
                       ("update", "update the running job in place (--update and the generated mapping)")):
        s = dsub.add_parser(verb, help=what)
        common(s)
        s.add_argument("--mapping", default=None)
        s.add_argument("--image", default=None)
        s.add_argument("--dry-run", action="store_true", help="write the request (--save-job) and stop")
        s.add_argument("--save-job", default=None)
        if verb == "update":
            s.add_argument("--validate-only", action="store_true",
                           help="ask Dataflow to check the update (graph_validate_only) without replacing the job")
            s.add_argument("--job-id", default=None)
            s.add_argument("--force", action="store_true", help="update even with an 'incompatible' verdict")

    for verb, what in (("drain", "drain the job (stop reading, finish in-flight work)"),
                       ("status", "the job's state and its last deploy record")):
        s = dsub.add_parser(verb, help=what)
        common(s, config=False)
        s.add_argument("--project", default=None, help="default: from the job's deploy record")
        s.add_argument("--region", default=None, help="default: from the job's deploy record")
        if verb == "drain":
            s.add_argument("--dry-run", action="store_true", help="print the drain request and send nothing")


def _renames(path: Optional[str]) -> dict:
    from deploy.manifest import NAME_MAPPING

    p = Path(path) if path else NAME_MAPPING
    data = json.loads(p.read_text()) if p.exists() else {}
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{p}: expected a JSON object of old step name (prefix) -> new name")
    return data


def _plan(args, beam_argv, out: TextIO) -> int:
    from deploy.dataflow.job import job_request
    from deploy.dataflow.records import DeployRecords, read_json, write_json
    from deploy.plan import INCOMPATIBLE, NEW_JOB, build_snapshot, compare, render
    from ingest.contract import load_contract

    records = DeployRecords(args.records)
    records.check_name(args.job)
    contract = load_contract(args.config)
    baseline = read_json(args.baseline) if args.baseline else records.latest(args.job)
    if args.baseline and baseline is None:
        raise FileNotFoundError(f"--baseline {args.baseline}: no such snapshot")
    current, dry = build_snapshot(contract, args.job, beam_argv, args.image)
    verdict = compare(baseline, current, _renames(args.mapping))
    warnings: list[str] = []
    if args.write_baseline:
        write_json(args.write_baseline, current)
    if args.save_job:
        update = verdict.verdict not in (NEW_JOB, INCOMPATIBLE)
        job_id = args.job_id or (baseline or {}).get("job_id")
        request = job_request(dry, update=update, replace_job_id=job_id, mapping=verdict.mapping)
        write_json(args.save_job, request)
        if update and not job_id:
            warnings.append("replaceJobId is empty: give --job-id, or let `headwater deploy update` resolve the "
                            "running job's id by name")
    if args.json:
        out.write(json.dumps({**verdict.to_json(), "warnings": warnings}, indent=1, sort_keys=True) + "\n")
    else:
        render(verdict, args.job, out)
        for w in warnings:
            out.write(f"  warning: {w}\n")
        if args.write_baseline:
            out.write(f"  wrote snapshot {args.write_baseline}\n")
        if args.save_job:
            out.write(f"  wrote job request {args.save_job}"
                      + ("" if verdict.verdict not in (NEW_JOB, INCOMPATIBLE) else " (a new job)") + "\n")
    return verdict.exit_code


def run_deploy(args, beam_argv: list[str], out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    cmd = args.deploy_cmd
    if cmd == "plan":
        return _plan(args, beam_argv, out)
    if cmd == "build":
        from deploy.dataflow.template import build_command

        return build_command(args, out)
    from deploy.dataflow import submit

    return {"launch": submit.launch, "update": submit.update, "drain": submit.drain,
            "status": submit.status}[cmd](args, beam_argv, out)
