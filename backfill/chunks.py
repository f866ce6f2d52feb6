"""Chunks of partner history: listed lazily from local paths, ``gs://`` and ``s3://``. No Beam.

``iter_chunks(patterns)`` yields one :class:`Chunk` per matching object, in the store's
listing order (lexicographic for GCS and S3, sorted per directory locally), page by page:
nothing is held beyond one page, and nothing is listed twice. Glob syntax is Beam's
(``*`` stays within one path segment, ``**`` crosses them), so a pattern selects the same
files ``headwater run`` would read.

Each chunk carries a *generation*: GCS's object generation, S3's ETag, ``mtime_ns-size``
locally. The backfill ledger records it: a chunk rewritten since it was backfilled is read
again, one that did not change is skipped.

``sample_chunks`` reads a few chunks fully to estimate events per byte and the event-time
span (``headwater backfill plan``).
"""
from __future__ import annotations

import gzip
import io
import os
import random
import re
from typing import Iterable, Iterator, Mapping, NamedTuple, Optional

import orjson

__all__ = ["Chunk", "iter_chunks", "glob_prefix", "Sample", "sample_chunks", "open_chunk", "ChunkListingError"]

_GLOB_CHARS = re.compile(r"[*?\[]")


class ChunkListingError(RuntimeError):
    """A pattern could not be listed (missing bucket, no credentials): terminal for the command."""


class Chunk(NamedTuple):
    uri: str
    size: int
    generation: str
    mtime_s: float


def glob_prefix(pattern: str) -> str:
    """The literal part of ``pattern`` before its first glob character."""
    m = _GLOB_CHARS.search(pattern)
    return pattern if m is None else pattern[:m.start()]


def _regex(pattern: str) -> "re.Pattern[str]":
    from apache_beam.io.filesystem import FileSystem

    return re.compile(FileSystem.translate_pattern(pattern))


def iter_chunks(patterns: Iterable[str], env: Optional[Mapping[str, str]] = None) -> Iterator[Chunk]:
    """Every object matching any of ``patterns``, lazily, in listing order (a URI matched by two
    patterns is yielded twice: the ledger skips it the second time)."""
    env = os.environ if env is None else env
    for pattern in patterns:
        if pattern.startswith("gs://"):
            yield from _gcs(pattern, env)
        elif pattern.startswith("s3://"):
            yield from _s3(pattern, env)
        elif "://" in pattern:
            raise ChunkListingError(f"--source {pattern!r}: only local paths, gs:// and s3:// are supported")
        else:
            yield from _local(pattern)


def _local(pattern: str) -> Iterator[Chunk]:
    pattern = os.path.abspath(os.path.expanduser(pattern))
    match = _regex(pattern).match
    prefix = glob_prefix(pattern)
    if prefix == pattern:  # no glob: one file
        if os.path.isfile(pattern):
            st = os.stat(pattern)
            yield Chunk(pattern, st.st_size, f"{st.st_mtime_ns}-{st.st_size}", st.st_mtime)
        return
    root = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
    recursive = "**" in pattern or os.sep in pattern[len(root):].lstrip(os.sep)
    # depth-first in name order: full paths come out sorted, like an object store's listing
    stack = [_sorted_entries(root or os.sep)]
    while stack:
        e = next(stack[-1], None)
        if e is None:
            stack.pop()
        elif e.is_dir(follow_symlinks=False):
            if recursive:
                stack.append(_sorted_entries(e.path))
        elif e.is_file() and match(e.path):
            st = e.stat()
            yield Chunk(e.path, st.st_size, f"{st.st_mtime_ns}-{st.st_size}", st.st_mtime)


def _sorted_entries(d: str) -> Iterator[os.DirEntry]:
    try:
        return iter(sorted(os.scandir(d), key=lambda e: e.name))  # one directory's entries at a time
    except FileNotFoundError:
        return iter(())


def _bucket_key(uri: str) -> tuple[str, str]:
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def gcs_client(env: Mapping[str, str]):
    from google.cloud import storage

    if env.get("STORAGE_EMULATOR_HOST"):
        os.environ.setdefault("STORAGE_EMULATOR_HOST", env["STORAGE_EMULATOR_HOST"])
        return storage.Client.create_anonymous_client()
    return storage.Client()


def _gcs(pattern: str, env: Mapping[str, str]) -> Iterator[Chunk]:
    from google.api_core import exceptions as gexc

    bucket, key_prefix = _bucket_key(glob_prefix(pattern))
    match = _regex(pattern).match
    try:
        for blob in gcs_client(env).list_blobs(bucket, prefix=key_prefix, page_size=1000):  # paged iterator
            uri = f"gs://{bucket}/{blob.name}"
            if match(uri):
                ts = blob.updated.timestamp() if blob.updated else 0.0
                yield Chunk(uri, int(blob.size or 0), str(blob.generation), ts)
    except gexc.NotFound as exc:
        raise ChunkListingError(f"--source {pattern!r}: bucket {bucket!r} not found") from exc


def s3_client(env: Mapping[str, str]):
    import boto3

    from ingest.objectstore import s3_endpoint

    return boto3.client("s3", endpoint_url=s3_endpoint(env),
                        region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                        aws_session_token=env.get("AWS_SESSION_TOKEN"))


def _s3(pattern: str, env: Mapping[str, str]) -> Iterator[Chunk]:
    bucket, key_prefix = _bucket_key(glob_prefix(pattern))
    match = _regex(pattern).match
    pages = s3_client(env).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
    try:
        for page in pages:
            for obj in page.get("Contents") or ():
                uri = f"s3://{bucket}/{obj['Key']}"
                if match(uri):
                    yield Chunk(uri, int(obj["Size"]), str(obj.get("ETag", "")).strip('"'),
                                obj["LastModified"].timestamp())
    except Exception as exc:  # noqa: BLE001 - botocore's NoSuchBucket is generated at runtime; re-raised typed
        if "NoSuchBucket" in type(exc).__name__ or "NoSuchBucket" in str(exc):
            raise ChunkListingError(f"--source {pattern!r}: bucket {bucket!r} not found") from exc
        raise


def open_chunk(uri: str, env: Optional[Mapping[str, str]] = None) -> bytes:
    """The raw bytes of one chunk (for sampling only: chunks read by the pipeline stream through Beam)."""
    env = os.environ if env is None else env
    if uri.startswith("gs://"):
        bucket, key = _bucket_key(uri)
        return gcs_client(env).bucket(bucket).blob(key).download_as_bytes()
    if uri.startswith("s3://"):
        bucket, key = _bucket_key(uri)
        return s3_client(env).get_object(Bucket=bucket, Key=key)["Body"].read()
    with open(uri, "rb") as fh:
        return fh.read()


class Sample(NamedTuple):
    """What a few fully read chunks say about all of them."""

    chunks: int
    bytes: int
    records: int
    min_event_us: Optional[int]
    max_event_us: Optional[int]
    in_range: int  # sampled records whose event time is in the backfill's range
    no_time: int  # sampled records without a readable event time

    @property
    def records_per_byte(self) -> float:
        return self.records / self.bytes if self.bytes else 0.0


def _records(uri: str, data: bytes, fmt: str) -> Iterator[bytes]:
    if fmt == "avro" or (fmt == "auto" and uri.lower().endswith(".avro")):
        import fastavro

        from ingest.file_source import _avro_default

        for rec in fastavro.reader(io.BytesIO(data)):
            yield orjson.dumps(rec, default=_avro_default)
        return
    if uri.lower().endswith(".gz"):
        data = gzip.decompress(data)
    for line in data.split(b"\n"):
        if line.strip():
            yield line


def sample_chunks(chunks: list[Chunk], envelope, fmt: str, in_range, env: Optional[Mapping[str, str]] = None) -> Sample:
    """Read ``chunks`` fully: records, event-time span (envelope locator) and how many fall in range."""
    from ingest.envelope import lookup_path, parse_event_time_us

    n = size = inr = no_time = 0
    lo: Optional[int] = None
    hi: Optional[int] = None
    for c in chunks:
        size += c.size
        for line in _records(c.uri, open_chunk(c.uri, env), fmt):
            n += 1
            try:
                doc = orjson.loads(line)
                us = parse_event_time_us(lookup_path(doc, envelope.event_time), envelope.event_time_format)
            except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError):
                no_time += 1
                continue
            lo = us if lo is None else min(lo, us)
            hi = us if hi is None else max(hi, us)
            inr += bool(in_range(us))
    return Sample(len(chunks), size, n, lo, hi, inr, no_time)


def reservoir(items: Iterator[Chunk], k: int, keep_first: int, seed: int = 0):
    """One pass over ``items``: (the first ``keep_first``, a uniform sample of ``k``, count, total bytes)."""
    rnd = random.Random(seed)
    first: list[Chunk] = []
    sample: list[Chunk] = []
    count = total = 0
    for c in items:
        if count < keep_first:
            first.append(c)
        if count < k:
            sample.append(c)
        else:
            j = rnd.randrange(count + 1)
            if j < k:
                sample[j] = c
        count += 1
        total += c.size
    return first, sample, count, total
