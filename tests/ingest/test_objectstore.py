"""gs:// (fake-gcs-server) and s3:// (moto) read back through Beam's filesystems and fileio.

Integration tests use the real local servers from deploy/local/services.sh (tests/conftest_cloud.py).
"""
from __future__ import annotations

import gzip
import io
import os
import time

import apache_beam as beam
import boto3
import fastavro
import pytest
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from ingest.objectstore import configure_gcs_emulator, objectstore_options
from tests.conftest_cloud import cloud_services, unique_id  # noqa: F401  (fixture)

_AVRO_SCHEMA = fastavro.parse_schema({"type": "record", "name": "E", "fields": [
    {"name": "id", "type": "string"}, {"name": "n", "type": "long"}]})


def _jsonl_gz(ids) -> bytes:
    return gzip.compress(b"".join(b'{"id":"%s"}\n' % i.encode() for i in ids))


def _avro(ids) -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, _AVRO_SCHEMA, [{"id": i, "n": k} for k, i in enumerate(ids)])
    return buf.getvalue()


def upload_gcs(host: str, bucket: str, objects: dict) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    os.environ["STORAGE_EMULATOR_HOST"] = host
    client = storage.Client(project="test-project", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": host})
    b = client.bucket(bucket)
    if not b.exists():
        client.create_bucket(bucket)
    for name, data in objects.items():
        client.bucket(bucket).blob(name).upload_from_string(data)


def upload_s3(endpoint: str, bucket: str, objects: dict) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for name, data in objects.items():
        s3.put_object(Bucket=bucket, Key=name, Body=data)


class _Records(beam.DoFn):
    """ReadableFile -> (path basename, id) for JSONL(.gz) and Avro."""

    def process(self, f):
        path = f.metadata.path
        with f.open() as fh:  # Beam decompresses .gz by extension (CompressionTypes.AUTO)
            data = fh.read()
        if path.endswith(".avro"):
            for rec in fastavro.reader(io.BytesIO(data)):
                yield path.rsplit("/", 1)[1], rec["id"]
        else:
            import orjson

            for line in data.splitlines():
                yield path.rsplit("/", 1)[1], orjson.loads(line)["id"]


# ---- pure --------------------------------------------------------------------------------------

def test_objectstore_options_from_env():
    env = {"HEADWATER_S3_ENDPOINT": "http://127.0.0.1:5000", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_DEFAULT_REGION": "us-east-1"}
    assert objectstore_options(env) == ["--s3_endpoint_url=http://127.0.0.1:5000", "--s3_access_key_id=k",
                                        "--s3_secret_access_key=s", "--s3_region_name=us-east-1"]
    # explicit argv wins; nothing configured -> nothing added (production on GCP)
    assert objectstore_options(env, ("--s3_endpoint_url=http://x",))[0] == "--s3_access_key_id=k"
    assert objectstore_options({}) == []
    assert objectstore_options({"AWS_ENDPOINT_URL_S3": "http://h:1"}) == ["--s3_endpoint_url=http://h:1"]


def test_configure_gcs_emulator_is_noop_without_host():
    assert configure_gcs_emulator({}) is False
    with pytest.raises(ValueError, match="STORAGE_EMULATOR_HOST"):
        configure_gcs_emulator({"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"})


# ---- integration -------------------------------------------------------------------------------

@pytest.mark.integration
def test_gcs_and_s3_chunks_read_back_through_fileio(cloud_services):
    gbucket, sbucket = unique_id("hwg").replace("_", "-"), unique_id("hws").replace("_", "-")
    upload_gcs(cloud_services.gcs, gbucket, {"acme/2026-01-01.jsonl.gz": _jsonl_gz(["g1", "g2"]),
                                             "acme/2026-01-02.avro": _avro(["g3"]),
                                             "other/ignored.jsonl.gz": _jsonl_gz(["x"])})
    upload_s3(cloud_services.s3, sbucket, {"acme/2026-01-01.jsonl.gz": _jsonl_gz(["s1"]),
                                           "acme/2026-01-02.avro": _avro(["s2", "s3"])})
    env = cloud_services.env()
    assert configure_gcs_emulator(env) is True
    argv = ["--runner=FnApiRunner", *objectstore_options(env)]
    t0 = time.monotonic()
    with beam.Pipeline(options=PipelineOptions(argv)) as p:
        got = ((p | "Patterns" >> beam.Create([f"gs://{gbucket}/acme/*", f"s3://{sbucket}/acme/*"])
                | "Match" >> fileio.MatchAll()
                | "ReadMatches" >> fileio.ReadMatches()
                | "Records" >> beam.ParDo(_Records())))
        assert_that(got, equal_to([("2026-01-01.jsonl.gz", "g1"), ("2026-01-01.jsonl.gz", "g2"),
                                   ("2026-01-02.avro", "g3"), ("2026-01-01.jsonl.gz", "s1"),
                                   ("2026-01-02.avro", "s2"), ("2026-01-02.avro", "s3")]))
    elapsed = time.monotonic() - t0
    # Without configure_gcs_emulator Beam spends ~20 s looking for Google credentials first.
    assert elapsed < 15, f"reading 4 small objects took {elapsed:.1f}s"
