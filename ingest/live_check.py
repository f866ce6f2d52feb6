"""Launch preflight of live sources: is every Kafka broker and Pub/Sub subscription usable *before* a runner starts?

``check_live_sources(contract)`` returns one line per problem, naming the partner, the source and
the fix, e.g.::

    partner 'orbit_live': sources[0] kafka 127.0.0.1:9092: broker not reachable (connection refused); fix: deploy/local/services.sh up kafka

Checks (each source in its own thread, every network call bounded by ``timeout_s``, ~3 s):

* Kafka: a bootstrap server accepts a TCP connection; the topics exist (``topics``), or at least
  one topic matches ``topic_pattern``;
* Pub/Sub: with ``PUBSUB_EMULATOR_HOST`` the emulator accepts a connection, without it
  Application Default Credentials resolve; the subscription exists, or, on the emulator, its
  ``topic`` exists and the subscription is created (as ``headwater publish`` does). On Google
  Cloud a missing subscription is reported with the ``gcloud`` command that creates it.

Nothing is left running: every client is closed before returning. Without this check a missing
broker or credential surfaced as retry loops and tracebacks deep inside the runner, with a
runner process left behind (issue 10, item 7). ``HEADWATER_SKIP_SOURCE_CHECKS=1`` skips the
checks (for a launch machine that cannot reach a broker its Dataflow workers reach).
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Optional

from ingest.contract import Contract, KafkaSource, PubSubSource

__all__ = ["check_live_sources", "SKIP_ENV", "DEFAULT_TIMEOUT_S"]

SKIP_ENV = "HEADWATER_SKIP_SOURCE_CHECKS"
DEFAULT_TIMEOUT_S = 3.0
_KAFKA_FIX = "deploy/local/services.sh up kafka"
_PUBSUB_FIX = "deploy/local/services.sh up pubsub && export PUBSUB_EMULATOR_HOST=127.0.0.1:8085"


def _hostport(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    m = re.match(r"^\[(?P<h6>[^\]]+)\](?::(?P<p6>\d+))?$|^(?P<h>[^:]+)(?::(?P<p>\d+))?$", text)
    if not m:
        raise ValueError(f"cannot parse host:port {text!r}")
    host = m.group("h6") or m.group("h")
    port = m.group("p6") or m.group("p")
    return host, int(port) if port else default_port


def _tcp(host: str, port: int, timeout_s: float) -> Optional[str]:
    """None when ``host:port`` accepts a TCP connection, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.timeout:
        return f"no answer within {timeout_s:g}s"
    except OSError as exc:
        return (exc.strerror or type(exc).__name__).lower()


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """kafka-python and google-auth log every failed attempt at ERROR; the check reports once, itself."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _check_kafka(spec: KafkaSource, partner: str, timeout_s: float) -> list[str]:
    servers = [s for s in spec.bootstrap_servers.split(",") if s.strip()]
    reasons = []
    for s in servers:
        try:
            host, port = _hostport(s, 9092)
        except ValueError as exc:
            return [f"bootstrap_servers: {exc}"]
        why = _tcp(host, port, timeout_s)
        if why is None:
            break
        reasons.append(f"{host}:{port} {why}")
    else:
        return [f"broker not reachable ({'; '.join(reasons)}); fix: {_KAFKA_FIX}"]
    from kafka import KafkaAdminClient

    ms = int(timeout_s * 1000)
    admin = None
    try:
        with _quiet("kafka"):
            admin = KafkaAdminClient(bootstrap_servers=servers, client_id="headwater-preflight",
                                     request_timeout_ms=ms, bootstrap_timeout_ms=ms,
                                     connections_max_idle_ms=max(ms * 3, 10_000))
            existing = set(admin.list_topics())
    except Exception as exc:  # noqa: BLE001 - any broker failure is one line, never a traceback
        return [f"broker answered but listing topics failed: {type(exc).__name__}: {str(exc)[:200]}; "
                f"fix: check the broker ({_KAFKA_FIX})"]
    finally:
        if admin is not None:
            with _quiet("kafka"):
                admin.close()
    create = (f"headwater publish --config <contract> --partner {partner} creates the first topic, "
              f"or kafka-topics.sh --create --topic <name>")
    if spec.topic_pattern:
        rx = re.compile(spec.topic_pattern)
        if not any(rx.fullmatch(t) for t in existing):
            return [f"no topic matches topic_pattern {spec.topic_pattern!r}; fix: {create}"]
        return []
    missing = [t for t in spec.topics if t not in existing]
    if missing:
        return [f"topic(s) {missing} not found; fix: {create}"]
    return []


def _check_pubsub(spec: PubSubSource, partner: str, timeout_s: float, env: Mapping[str, str],
                  create: bool) -> list[str]:
    emulator = env.get("PUBSUB_EMULATOR_HOST")
    if emulator:
        try:
            host, port = _hostport(emulator, 8085)
        except ValueError as exc:
            return [f"PUBSUB_EMULATOR_HOST: {exc}"]
        why = _tcp(host, port, timeout_s)
        if why is not None:
            return [f"Pub/Sub emulator at {emulator} (PUBSUB_EMULATOR_HOST) not reachable ({why}); "
                    f"fix: deploy/local/services.sh up pubsub"]
    else:
        problem = _adc_problem(timeout_s)
        if problem:
            return [f"no PUBSUB_EMULATOR_HOST and no Google credentials ({problem}); fix, locally: {_PUBSUB_FIX}; "
                    f"on Google Cloud: gcloud auth application-default login"]
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1

    sub_name = spec.subscription.rsplit("/", 1)[1]
    subscriber = pubsub_v1.SubscriberClient()
    try:
        try:
            subscriber.get_subscription(request={"subscription": spec.subscription}, timeout=timeout_s, retry=None)
            return []
        except gexc.NotFound:
            pass
        if not spec.topic:
            return [f"subscription does not exist and no 'topic' is configured to create it from; fix: add "
                    f"'topic' to the source, or create it: gcloud pubsub subscriptions create {sub_name} --topic <topic>"]
        publisher = pubsub_v1.PublisherClient()
        try:
            publisher.get_topic(request={"topic": spec.topic}, timeout=timeout_s, retry=None)
        except gexc.NotFound:
            return [f"subscription and its topic {spec.topic} do not exist; fix: headwater publish --config "
                    f"<contract> --partner {partner} creates both on the emulator"
                    + ("" if emulator else f", or gcloud pubsub topics create {spec.topic.rsplit('/', 1)[1]}")]
        finally:
            publisher.transport.close()
        if not emulator:
            return [f"subscription does not exist; fix: gcloud pubsub subscriptions create {sub_name} "
                    f"--topic {spec.topic}"]
        if not create:
            return []  # creatable: `headwater run` creates it on the emulator
        try:
            subscriber.create_subscription(request={"name": spec.subscription, "topic": spec.topic,
                                                    "ack_deadline_seconds": 20}, timeout=timeout_s, retry=None)
        except gexc.AlreadyExists:
            pass
        return []
    except gexc.GoogleAPICallError as exc:
        return [f"Pub/Sub call failed: {type(exc).__name__}: {str(exc)[:200]}"]
    except Exception as exc:  # noqa: BLE001 - deadline, transport: one line
        return [f"Pub/Sub not usable: {type(exc).__name__}: {str(exc)[:200]}"]
    finally:
        subscriber.close()


def _adc_problem(timeout_s: float) -> Optional[str]:
    """None when Application Default Credentials resolve (within ``timeout_s``), else why not."""
    out: list[Optional[str]] = []

    def probe() -> None:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            with _quiet("google.auth", "google.auth.compute_engine._metadata", "google.auth._default"):
                google.auth.default()
            out.append(None)
        except DefaultCredentialsError:
            out.append("Application Default Credentials not found")
        except Exception as exc:  # noqa: BLE001
            out.append(f"{type(exc).__name__}: {str(exc)[:120]}")

    t = threading.Thread(target=probe, name="headwater-adc-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    if not out:
        return f"credentials not resolved within {timeout_s:g}s"
    return out[0]


def check_live_sources(contract: Contract, timeout_s: float = DEFAULT_TIMEOUT_S,
                       env: Optional[Mapping[str, str]] = None, create_subscriptions: bool = True) -> list[str]:
    """One line per problem with a live source (empty: every source is usable). Never raises for a
    server problem; file sources are not checked here (``ingest.preflight`` globs them)."""
    env = os.environ if env is None else env
    if env.get(SKIP_ENV) == "1":
        return []
    jobs: list[tuple[str, Callable[[], list[str]]]] = []
    for p in contract.partners:
        for i, s in enumerate(p.sources):
            if isinstance(s, KafkaSource):
                where = f"partner {p.name!r}: sources[{i}] kafka {s.bootstrap_servers} {list(s.topics) or s.topic_pattern}"
                jobs.append((where, lambda s=s, p=p: _check_kafka(s, p.name, timeout_s)))
            elif isinstance(s, PubSubSource):
                where = f"partner {p.name!r}: sources[{i}] pubsub {s.subscription}"
                jobs.append((where, lambda s=s, p=p: _check_pubsub(s, p.name, timeout_s, env, create_subscriptions)))
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(jobs)), thread_name_prefix="headwater-preflight") as pool:
        futures = [(where, pool.submit(fn)) for where, fn in jobs]
        problems = []
        for where, fut in futures:
            try:
                found = fut.result()
            except Exception as exc:  # noqa: BLE001 - a check that broke is a problem line, not a traceback
                found = [f"check failed: {type(exc).__name__}: {str(exc)[:200]}"]
            problems += [f"{where}: {msg}" for msg in found]
    return problems
