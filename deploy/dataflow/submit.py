"""`headwater deploy launch | update | drain | status`: talk to Dataflow, detached, recorded.

* ``launch`` builds the job, submits it with DataflowRunner and returns once Dataflow has accepted it
  (never waits for it to finish). Ctrl-C during submission does not cancel anything: Beam only cancels a
  Dataflow job from ``wait_until_finish``, which is never called here; SIGINT/SIGTERM are held until the
  create request has returned, then the command exits saying what was submitted.
* ``update`` plans first (``deploy.plan``): an ``incompatible`` verdict stops it (exit 4) unless
  ``--force``; otherwise it submits with ``--update`` and the generated ``transform_name_mapping``.
  ``--validate-only`` adds Dataflow's ``graph_validate_only`` service option: Dataflow checks the
  update against the running job and replaces nothing.
* ``drain`` sets the job's requested state to ``JOB_STATE_DRAINING``; ``status`` prints the job's
  state and its last deploy record.
* Every launch/update records the snapshot it was built from (``deploy.dataflow.records``), keyed by
  job name, with the job id Dataflow returned: the next plan's baseline.

``--dry-run`` (launch, update, drain) builds and writes the request that would be sent (``--save-job``)
and sends nothing: that is how the tests exercise these commands without Google Cloud.
"""
from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, TextIO

from ingest.contract import Contract

__all__ = ["launch", "update", "drain", "status", "submit_pipeline", "held_signals", "drain_request", "update_argv"]


@contextmanager
def held_signals(out: TextIO) -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM while a job is being submitted; yields the signals received meanwhile."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def hold(signum, _frame):
        received.append(signum)
        out.write("headwater: submission in progress; it finishes first (a submitted Dataflow job is never "
                  "cancelled by this command)\n")
        out.flush()

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def submit_pipeline(contract: Contract, beam_argv: Sequence[str]):
    """Build and submit with DataflowRunner; returns the DataflowPipelineResult without waiting."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from ingest.pipeline import build

    options = PipelineOptions(list(beam_argv))
    if contract.streaming:
        options.view_as(StandardOptions).streaming = True
    p = beam.Pipeline(options=options)
    build(p, contract)
    return p.run()  # DataflowRunner returns once the job is created; nothing here waits or cancels


def _context(args, beam_argv):
    from deploy.dataflow.job import dataflow_argv
    from deploy.dataflow.records import DeployRecords
    from ingest.contract import load_contract

    records = DeployRecords(args.records)
    records.check_name(args.job)
    contract = load_contract(args.config)
    return records, contract, dataflow_argv(contract, args.job, beam_argv, args.image)


def _submit(contract, argv, snapshot, records, job, out, verb) -> int:
    with held_signals(out) as received:
        result = submit_pipeline(contract, argv)
    job_id = result.job_id() if hasattr(result, "job_id") else None
    snapshot["job_id"] = job_id
    path = records.record(job, snapshot)
    out.write(f"{verb} job {job}: submitted, id {job_id}; detached (the job keeps running; "
              f"`headwater deploy status --job {job}`)\n  recorded snapshot {path}\n")
    if received:
        out.write("headwater: interrupted after submission; the job was not cancelled\n")
        return 130
    return 0


def launch(args, beam_argv: list[str], out: TextIO) -> int:
    from deploy.dataflow.job import job_request
    from deploy.dataflow.records import write_json
    from deploy.plan import build_snapshot

    records, contract, argv = _context(args, beam_argv)
    snapshot, dry = build_snapshot(contract, args.job, argv, args.image)
    if args.save_job or args.dry_run:
        request = job_request(dry)
        if args.save_job:
            write_json(args.save_job, request)
        if args.dry_run:
            out.write(f"launch job {args.job}: dry run, nothing sent"
                      + (f"; request written to {args.save_job}" if args.save_job else "") + "\n")
            return 0
    return _submit(contract, argv, snapshot, records, args.job, out, "launch")


def update(args, beam_argv: list[str], out: TextIO) -> int:
    from deploy.commands import _renames
    from deploy.dataflow.job import job_request
    from deploy.dataflow.records import write_json
    from deploy.plan import INCOMPATIBLE, NEW_JOB, build_snapshot, compare, render

    records, contract, argv = _context(args, beam_argv)
    baseline = records.latest(args.job)
    if baseline is None:
        out.write(f"update job {args.job}: no deploy record under {records.root}; `headwater deploy launch` it, "
                  "or plan with --baseline\n")
        return 2
    snapshot, dry = build_snapshot(contract, args.job, argv, args.image)
    verdict = compare(baseline, snapshot, _renames(args.mapping))
    render(verdict, args.job, out)
    if verdict.verdict == INCOMPATIBLE and not args.force:
        return verdict.exit_code
    if verdict.verdict == NEW_JOB:
        return 2
    mapping = verdict.mapping
    argv = update_argv(argv, mapping, args.validate_only)
    job_id = args.job_id or baseline.get("job_id")
    if args.save_job or args.dry_run:
        from apache_beam.options.pipeline_options import GoogleCloudOptions

        if args.validate_only:  # Beam's Environment copies dataflow_service_options into serviceOptions
            gco = dry.options.view_as(GoogleCloudOptions)
            gco.dataflow_service_options = [*(gco.dataflow_service_options or []), "graph_validate_only"]
        request = job_request(dry, update=True, replace_job_id=job_id, mapping=mapping)
        if args.save_job:
            write_json(args.save_job, request)
        if args.dry_run:
            out.write(f"update job {args.job}: dry run, nothing sent"
                      + (f"; request written to {args.save_job}" if args.save_job else "") + "\n")
            return 0
    if args.validate_only:
        with held_signals(out):
            result = submit_pipeline(contract, argv)
        out.write(f"update job {args.job}: Dataflow validated the update ({getattr(result, 'state', '?')}); "
                  "nothing replaced\n")
        return 0
    return _submit(contract, argv, snapshot, records, args.job, out, "update")


_TIMEOUT_S = 30.0


def _jobs_client():
    """Dataflow's Jobs API client (google-cloud-dataflow-client, installed with apache-beam[gcp]); one
    attempt per call with a deadline: an operator command reports, it does not retry for minutes."""
    from google.cloud import dataflow_v1beta3

    return dataflow_v1beta3.JobsV1Beta3Client()


def update_argv(argv: Sequence[str], mapping: dict, validate_only: bool = False) -> list[str]:
    """The Beam options of an in-place update: ``--update``, the mapping as JSON, optionally Dataflow's
    ``graph_validate_only`` (check the update against the running job, replace nothing)."""
    out = [*argv, "--update", f"--transform_name_mapping={json.dumps(mapping, sort_keys=True)}"]
    if validate_only:
        out.append("--dataflow_service_options=graph_validate_only")
    return out


def drain_request(project: str, region: str, job_id: str) -> dict:
    """The ``projects.locations.jobs.update`` request that drains a job."""
    return {"projectId": project, "location": region, "jobId": job_id, "job": {"requestedState": "JOB_STATE_DRAINING"}}


def _where(args, record: Optional[dict]) -> tuple[Optional[str], str]:
    from deploy.dataflow.job import DEFAULT_REGION

    project = args.project or (record or {}).get("project")
    region = args.region or (record or {}).get("region") or DEFAULT_REGION
    return project, region


def drain(args, beam_argv: list[str], out: TextIO) -> int:
    from deploy.dataflow.records import DeployRecords

    records = DeployRecords(args.records)
    record = records.latest(args.job)
    project, region = _where(args, record)
    job_id = (record or {}).get("job_id")
    if not project or not job_id:
        out.write(f"drain job {args.job}: need --project and a recorded job id (deploy record under {records.root})\n")
        return 2
    request = drain_request(project, region, job_id)
    if args.dry_run:
        out.write(json.dumps(request, indent=1, sort_keys=True) + "\n")
        return 0
    from google.cloud import dataflow_v1beta3

    _jobs_client().update_job(request={
        "project_id": project, "location": region, "job_id": job_id,
        "job": {"requested_state": dataflow_v1beta3.JobState.JOB_STATE_DRAINING}}, timeout=_TIMEOUT_S)
    out.write(f"drain job {args.job} ({job_id}): requested; Dataflow stops reading and finishes in-flight work. "
              f"Then `headwater deploy launch` the replacement.\n")
    return 0


def status(args, beam_argv: list[str], out: TextIO) -> int:
    from deploy.dataflow.records import DeployRecords

    records = DeployRecords(args.records)
    record = records.latest(args.job)
    if record is None:
        out.write(f"job {args.job}: no deploy record under {records.root}\n")
        return 1
    summary = {k: record.get(k) for k in ("job_name", "job_id", "created", "image", "beam_version", "streaming")}
    project, region = _where(args, record)
    state = None
    if project and record.get("job_id"):
        try:
            job = _jobs_client().get_job(request={"project_id": project, "location": region,
                                                  "job_id": record["job_id"]}, timeout=_TIMEOUT_S)
            state = job.current_state.name
        except Exception as exc:  # noqa: BLE001 - status reports what it could not reach, never a traceback
            state = f"unknown (Dataflow not reachable: {type(exc).__name__})"
    summary["state"] = state
    if args.json:
        out.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    else:
        out.write(f"job {args.job}: id {summary['job_id']}, state {state or 'unknown (no --project)'}\n"
                  f"  last deploy {summary['created']}, image {summary['image']}, Beam {summary['beam_version']}\n")
    return 0
