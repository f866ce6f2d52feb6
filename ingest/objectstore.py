"""Object-store plumbing for file sources: gs:// and s3:// through Beam's filesystems.

Production needs nothing from here: on Dataflow, gs:// uses the worker's service
account and s3:// the ``--s3_*`` options the user passes. Locally (and in tests)
the same pipeline reads from fake-gcs-server and moto, configured from the
environment::

    STORAGE_EMULATOR_HOST=http://127.0.0.1:4443     # fake-gcs-server (svc_gcs.sh)
    HEADWATER_S3_ENDPOINT=http://127.0.0.1:5000     # moto (svc_s3.sh); AWS_ENDPOINT_URL_S3 also works
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION

* :func:`objectstore_options` turns that environment into Beam argv
  (``--s3_endpoint_url`` ...). Beam's S3 filesystem reads only its options, not
  boto's environment, so without them s3:// goes to AWS.
* :func:`configure_gcs_emulator` makes Beam's gcsio talk to fake-gcs-server
  *without* the ~20 s Application Default Credentials lookup Beam performs
  (four retried ``google.auth.default()`` calls) before it falls back to an
  anonymous client, which is what an emulator wants anyway. It is a no-op
  unless STORAGE_EMULATOR_HOST is set, so it can never change a production run.
  Call it in the process that runs the pipeline (in-process FnApiRunner /
  DirectRunner); worker processes of a multi-process runner would each pay the
  lookup once.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

__all__ = ["objectstore_options", "configure_gcs_emulator", "s3_endpoint"]


def s3_endpoint(env: Mapping[str, str]) -> Optional[str]:
    """The S3 endpoint override, if any (HEADWATER_S3_ENDPOINT, else boto's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)."""
    return env.get("HEADWATER_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


def objectstore_options(env: Optional[Mapping[str, str]] = None, argv: tuple[str, ...] = ()) -> list[str]:
    """Beam pipeline argv for s3:// from ``env`` (default ``os.environ``); options already in ``argv`` win.

    Returns ``[]`` when no S3 endpoint override and no AWS keys are set (production on GCP).
    Note: Beam shows pipeline options in the Dataflow job page, including ``--s3_secret_access_key``;
    in production prefer short-lived keys scoped to the source bucket.
    """
    env = os.environ if env is None else env
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    out: list[str] = []

    def add(flag: str, value: Optional[str]) -> None:
        if value and flag not in given:
            out.append(f"{flag}={value}")

    add("--s3_endpoint_url", s3_endpoint(env))
    add("--s3_access_key_id", env.get("AWS_ACCESS_KEY_ID"))
    add("--s3_secret_access_key", env.get("AWS_SECRET_ACCESS_KEY"))
    add("--s3_session_token", env.get("AWS_SESSION_TOKEN"))
    add("--s3_region_name", env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
    return out


def configure_gcs_emulator(env: Optional[Mapping[str, str]] = None) -> bool:
    """If STORAGE_EMULATOR_HOST is set in ``env``: export it and make Beam use anonymous GCS credentials.

    Returns True when the emulator is configured, False (and changes nothing) otherwise.
    Raises RuntimeError if this Beam version no longer has the credential cache this relies on,
    so a Beam upgrade fails a test instead of silently making every local run 20 s slower.
    """
    env = os.environ if env is None else env
    host = env.get("STORAGE_EMULATOR_HOST")
    if not host:
        return False
    if not host.startswith(("http://", "https://")):
        raise ValueError(f"STORAGE_EMULATOR_HOST must be a URL like http://127.0.0.1:4443, got {host!r}")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    from apache_beam.internal.gcp import auth

    creds = getattr(auth, "_Credentials", None)
    if creds is None or not hasattr(creds, "_credentials_init") or not hasattr(creds, "_credentials_lock"):
        raise RuntimeError("apache_beam.internal.gcp.auth._Credentials changed; update ingest/objectstore.py "
                           "(it pre-seeds Beam's credential cache with 'anonymous' for the GCS emulator)")
    with creds._credentials_lock:
        # None is what Beam caches when ADC is absent: gcsio then builds
        # storage.Client.create_anonymous_client(), which honours STORAGE_EMULATOR_HOST.
        creds._credentials = None
        creds._credentials_init = True
    return True
