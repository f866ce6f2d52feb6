"""Deploy records: the snapshot each deploy was built from, keyed by job name (local dir or gs://).

``<root>/<job name>.json`` holds the latest deployed snapshot (with the Dataflow job id once known);
``<root>/<job name>/<created>.json`` keeps every one for rollback and audit. The root is
``--records`` / ``HEADWATER_DEPLOY_RECORDS`` (default ``./.headwater/deploys``); on a team, a gs:// path.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

__all__ = ["DeployRecords", "read_json", "write_json", "default_root"]

_JOB = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # Dataflow job names


def default_root() -> str:
    return os.environ.get("HEADWATER_DEPLOY_RECORDS", "./.headwater/deploys")


def _gcs():
    from apache_beam.io.filesystems import FileSystems

    from ingest.objectstore import configure_gcs_emulator

    configure_gcs_emulator()  # STORAGE_EMULATOR_HOST (local fake-gcs-server) only; no-op otherwise
    return FileSystems


def read_json(path: str) -> Optional[dict]:
    """A JSON document from a local path or gs://...; None when it does not exist."""
    if path.startswith("gs://"):
        FileSystems = _gcs()

        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path) as f:
            return json.loads(f.read())
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, doc: dict) -> None:
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    if path.startswith("gs://"):
        FileSystems = _gcs()
        with FileSystems.create(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class DeployRecords:
    def __init__(self, root: Optional[str] = None):
        self.root = (root or default_root()).rstrip("/")

    @staticmethod
    def check_name(job: str) -> str:
        if not _JOB.match(job):
            raise ValueError(f"job name {job!r}: Dataflow job names are [a-z]([-a-z0-9]*[a-z0-9])?, at most 63 chars")
        return job

    def path(self, job: str) -> str:
        return f"{self.root}/{self.check_name(job)}.json"

    def latest(self, job: str) -> Optional[dict]:
        return read_json(self.path(job))

    def record(self, job: str, snapshot: dict) -> str:
        """Store ``snapshot`` as the job's latest deploy (and in its history); returns the path."""
        stamp = re.sub(r"[^0-9T]", "", snapshot.get("created", "")) or "unknown"
        write_json(f"{self.root}/{self.check_name(job)}/{stamp}.json", snapshot)
        write_json(self.path(job), snapshot)
        return self.path(job)
