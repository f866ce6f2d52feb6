"""The masking key where the job runs: Secret Manager (``masking.key_secret``), else env var / file / dev key.

On Dataflow the key must not travel through pipeline options (they are shown on the job page and
stored with the job) nor through the pickled DoFns (staged with the job): each worker reads it in
``DoFn.setup`` with its own service account (role ``roles/secretmanager.secretAccessor`` on that one
secret). ``SECRET_MANAGER_EMULATOR_HOST`` (host:port, plaintext gRPC) points the client at a local
server, as ``PUBSUB_EMULATOR_HOST`` does for Pub/Sub. Errors name the secret, never its value.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from flatten.mask import MaskKeyError, decode_mask_key, load_mask_key
from ingest.contract import MaskingSpec

__all__ = ["contract_mask_key", "secret_mask_key", "EMULATOR_ENV"]

EMULATOR_ENV = "SECRET_MANAGER_EMULATOR_HOST"


def _client() -> Any:
    try:
        from google.cloud import secretmanager
    except ImportError:
        raise MaskKeyError("masking.key_secret is set but google-cloud-secret-manager is not installed "
                           "(pip install google-cloud-secret-manager; it is in the worker image)") from None
    host = os.environ.get(EMULATOR_ENV)
    if host:
        import grpc
        from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
            SecretManagerServiceGrpcTransport)

        return secretmanager.SecretManagerServiceClient(
            transport=SecretManagerServiceGrpcTransport(channel=grpc.insecure_channel(host)))
    return secretmanager.SecretManagerServiceClient()


def secret_mask_key(name: str, client: Optional[Any] = None) -> bytes:
    """The key stored in Secret Manager secret version ``name`` (projects/P/secrets/S/versions/V)."""
    from google.api_core import exceptions

    client = client or _client()
    try:
        response = client.access_secret_version(request={"name": name}, timeout=30)
    except exceptions.GoogleAPICallError as exc:
        raise MaskKeyError(f"masking.key_secret {name}: {type(exc).__name__} ({exc.code}): "
                           f"{exc.message}") from None
    return decode_mask_key(response.payload.data, f"masking.key_secret {name}")


def contract_mask_key(masking: MaskingSpec, client: Optional[Any] = None) -> bytes:
    """The key for ``masking``: the secret when ``key_secret`` is set, else ``load_mask_key``."""
    if masking.key_secret:
        return secret_mask_key(masking.key_secret, client)
    return load_mask_key(masking.key_env, masking.key_file, masking.allow_dev_key)
