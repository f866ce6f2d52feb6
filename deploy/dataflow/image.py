"""The headwater worker image: its tag, and how it is built (deploy/dataflow/Dockerfile)."""
from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["image_tag", "source_digest", "BEAM_VERSION", "PYTHON_VERSION", "BASE_IMAGE", "DOCKERFILE", "REPO_ROOT"]

BEAM_VERSION = "2.77.0"
PYTHON_VERSION = "3.11"
BASE_IMAGE = f"apache/beam_python{PYTHON_VERSION}_sdk:{BEAM_VERSION}"
REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = Path(__file__).resolve().parent / "Dockerfile"
#: What goes into the image: a change to any of these files changes the tag.
_SOURCES = ("pyproject.toml", "flatten", "state", "sinks", "ingest", "backfill", "deploy", "native")
_SKIP_SUFFIXES = (".pyc", ".duckdb", ".so")


def source_digest(root: Path = REPO_ROOT) -> str:
    """sha256 (first 12 hex) over the image's source files, paths and contents, in sorted order."""
    h = hashlib.sha256(f"{BASE_IMAGE}\n".encode())
    for top in _SOURCES:
        base = root / top
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(root).as_posix()
            if "__pycache__" in rel or "/target/" in rel or rel.endswith(_SKIP_SUFFIXES):
                continue
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def image_tag(project: str, region: str, repository: str = "headwater", digest: str | None = None) -> str:
    """``<region>-docker.pkg.dev/<project>/<repository>/worker:<beam>-py<py>-<source digest>``."""
    d = digest or source_digest()
    return f"{region}-docker.pkg.dev/{project}/{repository}/worker:beam{BEAM_VERSION}-py{PYTHON_VERSION}-{d}"
