"""`headwater deploy build`: the worker image tag, the command that builds it, and the flex template spec.

This machine cannot run docker, so the command prints the build and push commands for the tag
(``deploy/dataflow/Dockerfile``, context = repository root) and writes the two files a flex template
needs: ``metadata.json`` (what ``gcloud dataflow flex-template build --metadata-file`` takes) and
``headwater-flex-template.json`` (the spec that command uploads: image, SDK language, metadata,
default environment). Upload the spec to ``--template-gcs`` and launch with
``gcloud dataflow flex-template run NAME --template-file-gcs-location ... --parameters config=gs://...``.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TextIO

from deploy.dataflow.image import BASE_IMAGE, DOCKERFILE, REPO_ROOT, image_tag

__all__ = ["template_metadata", "template_spec", "build_command", "SPEC_FILE", "METADATA_FILE"]

SPEC_FILE = "headwater-flex-template.json"
METADATA_FILE = "metadata.json"


def template_metadata(streaming: bool) -> dict:
    """Flex template metadata: the parameters the launcher passes to deploy/dataflow/flex_main.py."""
    return {
        "name": "headwater",
        "description": "Partners' events from Pub/Sub, Kafka and files -> masked, flattened rows and per-user "
                       "aggregates in BigQuery (headwater).",
        "streaming": streaming,
        "supportsAtLeastOnce": False,
        "supportsExactlyOnce": True,
        "parameters": [
            {"name": "config", "label": "Partner contract", "isOptional": False,
             "helpText": "The contract YAML: gs://bucket/path/headwater.yaml. The masking key is never a "
                         "parameter: set masking.key_secret (Secret Manager) in the contract.",
             "regexes": [r"^gs:\/\/[^\n\r]+$"]},
        ],
    }


def template_spec(tag: str, streaming: bool) -> dict:
    meta = template_metadata(streaming)
    meta = {k: v for k, v in meta.items() if v is not None}
    return {
        "image": tag,
        "sdkInfo": {"language": "PYTHON"},
        "metadata": meta,
        "defaultEnvironment": {
            # the same image runs the workers: nothing is staged or installed at worker start
            "sdkContainerImage": tag,
            "additionalExperiments": ["use_runner_v2"],
        },
    }


def build_command(args, out: TextIO) -> int:
    from deploy.dataflow.job import DEFAULT_REGION
    from ingest.contract import load_contract

    contract = load_contract(args.config)
    region = args.region or DEFAULT_REGION
    tag = image_tag(args.project, region, args.repository)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / METADATA_FILE).write_text(json.dumps(
        {k: v for k, v in template_metadata(contract.streaming).items() if v is not None}, indent=1) + "\n")
    spec = template_spec(tag, contract.streaming)
    (outdir / SPEC_FILE).write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
    dockerfile = DOCKERFILE.relative_to(REPO_ROOT).as_posix()
    target = args.template_gcs or f"gs://{args.project}-headwater/templates/{SPEC_FILE}"
    out.write(f"{tag}\n")
    out.write(f"# base {BASE_IMAGE}; build it (this machine has no docker):\n"
              f"docker build -f {dockerfile} -t {shlex.quote(tag)} {shlex.quote(str(REPO_ROOT))}\n"
              f"docker push {shlex.quote(tag)}\n"
              f"# or: gcloud builds submit {shlex.quote(str(REPO_ROOT))} --config=<cloudbuild with -f {dockerfile}>\n"
              f"# template spec written: {outdir / SPEC_FILE} (metadata: {outdir / METADATA_FILE}); upload it:\n"
              f"gcloud storage cp {shlex.quote(str(outdir / SPEC_FILE))} {shlex.quote(target)}\n")
    return 0
