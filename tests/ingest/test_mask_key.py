"""The masking key from Secret Manager, read in DoFn.setup, against a local gRPC server that speaks
Secret Manager's AccessSecretVersion (the real google-cloud-secret-manager client talks to it)."""
from __future__ import annotations

import base64
from concurrent import futures

import grpc
import orjson
import pytest
from google.cloud.secretmanager_v1.types import AccessSecretVersionRequest, AccessSecretVersionResponse, SecretPayload

from flatten.mask import MaskKeyError, Masker
from flatten.records import Event, RawMessage
from ingest.contract import parse_contract
from ingest.mask_key import EMULATOR_ENV, contract_mask_key

KEY = b"k3y-from-secret-manager-0123456789"
SECRET = "projects/acme-data/secrets/headwater-mask-key/versions/3"
SHORT = "projects/acme-data/secrets/too-short/versions/1"


class SecretServer:
    """AccessSecretVersion over plaintext gRPC on 127.0.0.1 (what SECRET_MANAGER_EMULATOR_HOST points at)."""

    def __init__(self, secrets: dict[str, bytes]):
        self.secrets = secrets
        self.requests: list[str] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler("google.cloud.secretmanager.v1.SecretManagerService", {
            "AccessSecretVersion": grpc.unary_unary_rpc_method_handler(
                self._access, request_deserializer=AccessSecretVersionRequest.deserialize,
                response_serializer=AccessSecretVersionResponse.serialize)})
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def _access(self, request, context):
        self.requests.append(request.name)
        if request.name not in self.secrets:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Secret Version [{request.name}] not found.")
        return AccessSecretVersionResponse(name=request.name, payload=SecretPayload(data=self.secrets[request.name]))

    def __enter__(self):
        self._server.start()
        return self

    def __exit__(self, *exc):
        self._server.stop(grace=None)


@pytest.fixture
def secrets(monkeypatch):
    with SecretServer({SECRET: b"base64:" + base64.b64encode(KEY), SHORT: b"tiny"}) as server:
        monkeypatch.setenv(EMULATOR_ENV, f"127.0.0.1:{server.port}")
        monkeypatch.delenv("HEADWATER_MASK_KEY", raising=False)
        yield server


def _contract(key_secret: str):
    return parse_contract({
        "masking": {"key_secret": key_secret},
        "partners": [{"name": "acme", "sources": [{"kind": "file", "pattern": "/nonexistent/*.jsonl"}],
                      "columns": [{"path": "user.email", "pii": "hash"}], "table": {"name": "acme_events"}}]})


def test_key_comes_from_the_secret_version(secrets):
    assert contract_mask_key(_contract(SECRET).masking) == KEY
    assert secrets.requests == [SECRET]


def test_missing_secret_and_bad_value_fail_naming_the_secret_never_the_value(secrets):
    with pytest.raises(MaskKeyError, match=r"masking.key_secret projects/acme-data/secrets/nope/versions/1: NotFound"):
        contract_mask_key(_contract("projects/acme-data/secrets/nope/versions/1").masking)
    with pytest.raises(MaskKeyError) as exc:
        contract_mask_key(_contract(SHORT).masking)
    assert SHORT in str(exc.value) and "shorter than" in str(exc.value) and "tiny" not in str(exc.value)


def test_key_secret_is_validated_in_the_contract():
    with pytest.raises(ValueError, match="masking.key_secret"):
        _contract("my-secret")


def test_parse_step_masks_with_the_secret_key_read_in_setup(secrets):
    from ingest.parse import _ParseFn

    fn = _ParseFn(_contract(SECRET), "Headwater/ParseEnvelope")
    assert secrets.requests == []  # nothing is read when the step is built (the launcher, pickling)
    fn.setup()
    assert secrets.requests == [SECRET]
    payload = orjson.dumps({"id": "e1", "timestamp": "2026-05-01T10:00:00Z", "user": {"id": "u1", "email": "a@b.c"}})
    out = list(fn.process(RawMessage("acme", "file", "file:x:1", payload, b"{}", 0)))
    assert len(out) == 1 and isinstance(out[0], Event)
    doc = orjson.loads(out[0].doc)
    with_secret = Masker(_contract(SECRET).partners[0].columns, KEY).hash_value("a@b.c")
    other = Masker(_contract(SECRET).partners[0].columns, b"another-key-0123456789").hash_value("a@b.c")
    assert doc["user"]["email"] == with_secret != other
