"""The masking key never travels with the Dataflow job: not in the job request, its pipeline options or
display data, not in the pipeline proto, not inside any pickled DoFn, even when the launching machine
holds it (environment variable) or a secret names it."""
from __future__ import annotations

import base64
import bz2
import json
import zlib
from pathlib import Path

import pytest
import yaml
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from deploy.dataflow.job import dry_run, job_request
from ingest.contract import parse_contract

ROOT = Path(__file__).resolve().parents[2]
KEY = "launcher-held-mask-key-5f1c9a0e77d2"
SECRET = "projects/acme-data/secrets/headwater-mask-key/versions/7"


def _blobs(proto) -> list[bytes]:
    """Every DoFn payload, raw and decoded the way Beam encodes it (base64 of bz2 or zlib of the pickle)."""
    out = []
    for t in proto.components.transforms.values():
        if t.spec.urn != common_urns.primitives.PAR_DO.urn:
            continue
        raw = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload).do_fn.payload
        out.append(raw)
        try:
            decoded = base64.b64decode(raw, validate=True)
        except ValueError:
            continue
        if decoded.startswith(b"BZh"):
            out.append(bz2.decompress(decoded))  # Beam's DoFn payloads: base64(bz2(pickle))
        else:
            try:
                out.append(zlib.decompress(decoded))
            except zlib.error:
                out.append(decoded)
    return out


@pytest.mark.parametrize("masking", [{"key_env": "HW_TEST_MASK_KEY"}, {"key_secret": SECRET}], ids=["env", "secret"])
def test_key_is_in_no_part_of_the_job(masking, monkeypatch):
    monkeypatch.setenv("HW_TEST_MASK_KEY", KEY)
    monkeypatch.setenv("HEADWATER_MASK_KEY", KEY)
    raw = yaml.safe_load((ROOT / "examples" / "streaming.yaml").read_text())
    raw["masking"] = masking
    contract = parse_contract(raw, "streaming.yaml")
    dry = dry_run(contract, "hw-key-check", ["--project=acme-data", "--region=europe-west1"])
    proto_bytes = dry.proto.SerializeToString()
    blobs = _blobs(dry.proto)
    assert len(blobs) > 10
    request = json.dumps(job_request(dry, update=True, replace_job_id="j1", mapping={}))
    opts = json.loads(request)["job"]["environment"]["sdkPipelineOptions"]
    assert opts["options"]["job_name"] == "hw-key-check"  # the options are there...
    for needle in (KEY, base64.b64encode(KEY.encode()).decode(), KEY.encode().hex()):
        assert needle not in request  # ...the key is not (options, display data, labels, environment)
        assert needle.encode() not in proto_bytes
        assert not [b for b in blobs if needle.encode() in b]
    # positive controls (the search does see inside the DoFns): the *names* travel, workers read the values
    name = SECRET if "key_secret" in masking else "HW_TEST_MASK_KEY"
    assert any(name.encode() in b for b in blobs)
