"""Build the Dataflow job offline, the way Beam's DataflowRunner does, and the request it would send.

``dry_run(contract, job_name, argv)`` runs the pipeline with ``DataflowRunner`` and ``--dry_run=True``:
the runner applies its overrides (native Pub/Sub read, ...), resolves the container environment and
builds ``apiclient.Job`` (the job proto and the pipeline proto) without contacting Google Cloud.
``job_request(...)`` then fills the parts ``DataflowApplicationClient.create_job_description`` adds
before ``projects.locations.jobs.create``: the environment (worker pool with the SDK container image,
``sdkPipelineOptions``, experiments), and for an update ``replaceJobId`` and ``transformNameMapping``
(set on the proto directly: Beam's ``Job`` would look the job id up over the network). What differs
from the real request: ``clientRequestId`` (a timestamp), and the staged pipeline URL/hash, which name
the same proto this module serialises.
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions, TestOptions

from ingest.contract import Contract

__all__ = ["DryRun", "dataflow_argv", "dry_run", "job_request", "DEFAULT_REGION", "flag"]

DEFAULT_REGION = "us-central1"


class DryRun(NamedTuple):
    job: object  # apache_beam.runners.dataflow.internal.apiclient.Job
    proto: object  # beam_runner_api_pb2.Pipeline, as the runner will stage it
    options: PipelineOptions


def flag(argv: Sequence[str], name: str) -> Optional[str]:
    """Value of ``--name=value`` / ``--name value`` in ``argv`` (last wins), else None."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
    return value


def dataflow_argv(contract: Contract, job_name: str, argv: Sequence[str] = (), image: Optional[str] = None) -> list[str]:
    """Beam options for the Dataflow job: the user's argv, plus defaults for what is missing
    (project from the BigQuery warehouse, region, temp location, the headwater worker image)."""
    from deploy.dataflow.image import image_tag

    out = list(argv)
    project = flag(out, "project") or contract.warehouse.project or "headwater-project"
    region = flag(out, "region") or DEFAULT_REGION
    defaults = {
        "runner": "DataflowRunner",
        "project": project,
        "region": region,
        "job_name": job_name,
        "temp_location": f"gs://{project}-headwater/tmp",
        "sdk_container_image": image or image_tag(project, region),
        # Everything runs from the container (headwater and its native extension are installed in it):
        # nothing is staged from this machine but the pipeline proto.
        "sdk_location": "container",
    }
    for name, value in defaults.items():
        if flag(out, name) is None:
            out.append(f"--{name}={value}")
    if contract.streaming and "--streaming" not in out:
        out.append("--streaming")
    return out


def dry_run(contract: Contract, job_name: str, argv: Sequence[str] = (), image: Optional[str] = None) -> DryRun:
    """Build the job with DataflowRunner in dry-run mode (no network)."""
    from ingest.pipeline import build

    args = dataflow_argv(contract, job_name, argv, image)
    if "--dry_run=True" not in args:
        args.append("--dry_run=True")
    options = PipelineOptions(args)
    if contract.streaming:
        options.view_as(StandardOptions).streaming = True
    p = beam.Pipeline(options=options)
    build(p, contract)
    result = p.run()
    job = result.job
    return DryRun(job=job, proto=job.proto_pipeline, options=job.options)


def job_request(dry: DryRun, *, update: bool = False, replace_job_id: Optional[str] = None,
                mapping: Optional[Mapping[str, str]] = None) -> dict:
    """The ``projects.locations.jobs.create`` request DataflowRunner would send for ``dry``:
    ``{"projectId", "location", "job": <Job JSON>}``."""
    from apache_beam.runners.dataflow.internal import apiclient
    from apache_beam.runners.internal import names as shared_names

    job = dry.job
    options = job.options
    gco = options.view_as(GoogleCloudOptions)
    if update:
        # What `--update --transform_name_mapping=...` would put in the options (and so in
        # sdkPipelineOptions); set after Job() so Beam does not look the running job up over the network.
        gco.update = True
        gco.transform_name_mapping = dict(mapping or {})
    options.view_as(TestOptions).dry_run = False  # the request DataflowRunner sends is not a dry run
    apiclient.DataflowApplicationClient._apply_sdk_environment_overrides(job.proto_pipeline, {}, options)
    serialized = job.proto_pipeline.SerializeToString()
    staged = gco.staging_location.rstrip("/") + "/" + shared_names.STAGED_PIPELINE_FILENAME
    job.proto.environment = apiclient.Environment(
        packages=[], options=options, environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
        proto_pipeline_staged_url=staged, proto_pipeline=job.proto_pipeline,
        pipeline_proto_hash=hashlib.sha256(serialized).hexdigest()).proto
    if update:
        job.proto.replace_job_id = replace_job_id or ""
        job.proto.transform_name_mapping.clear()
        job.proto.transform_name_mapping.update(dict(mapping or {}))
    body = json.loads(job.json())
    return {"projectId": gco.project, "location": gco.region, "job": body}
