"""The live status line of a streaming ``headwater run`` (terminal only).

Every ``--status-every`` seconds (default 10) one line, redrawn in place by rich::

    events 12,345 in (1,234/s) · rows 12,300 written · aggregates 410 · dead letters 12 · duplicates 3 ·
    state keys 300 · kafka lag 15 (orbit-offers/0 12, orbit-offers/2 3)

Numbers come from :mod:`flatten.live`, bumped by the same DoFn calls that increment the Beam
metrics of namespace ``headwater`` (``events_parsed``, ``warehouse_rows_written`` /
``bigquery_rows_written``, ``*_aggregates_written``, ``*_dead_letters_written`` + rejected rows,
``duplicate_events``, ``state_keys_created`` - ``state_keys_expired``), so the line and the job's
metrics agree. Kafka lag is end offset minus the consumer group's committed offset per partition
(two metadata requests per refresh, 3 s timeout; what a restart would re-read). A Pub/Sub backlog is
not shown: the emulator has no backlog API and Cloud Monitoring is not cheap to poll from here.

Nothing is drawn unless stdout is a terminal (CI logs stay clean); the local runners run the SDK
worker in this process, on Dataflow the line would stay at zero, so it is for local runs.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, NamedTuple, Optional, TextIO

from flatten import live

__all__ = ["Snapshot", "collect", "format_status", "KafkaLag", "StatusLine", "DEFAULT_EVERY_S"]

DEFAULT_EVERY_S = 10.0


class Snapshot(NamedTuple):
    t: float  # monotonic seconds
    events_in: int
    rows_written: int
    aggregates_written: int
    dead_letters: int
    duplicates: int
    state_keys: int
    kafka_lag: Optional[dict]  # {"topic/partition": lag} or None (no Kafka source / unknown)


def collect(now: float, counts: Optional[dict] = None, kafka_lag: Optional[dict] = None) -> Snapshot:
    """A snapshot of the live counters (``counts``: a :func:`flatten.live.snapshot`, read when None)."""
    c = live.snapshot() if counts is None else counts
    return Snapshot(t=now, events_in=c.get("events_in", 0), rows_written=c.get("rows_written", 0),
                    aggregates_written=c.get("aggregates_written", 0),
                    dead_letters=c.get("dead_letters_written", 0), duplicates=c.get("duplicates", 0),
                    state_keys=c.get("state_keys_created", 0) - c.get("state_keys_expired", 0),
                    kafka_lag=kafka_lag)


def _lag_text(lag: dict) -> str:
    total = sum(lag.values())
    busy = sorted(((v, k) for k, v in lag.items() if v), reverse=True)[:4]
    parts = ", ".join(f"{k} {v:,}" for v, k in sorted(busy, key=lambda x: x[1]))
    more = ", ..." if sum(1 for v in lag.values() if v) > len(busy) else ""
    return f"kafka lag {total:,}" + (f" ({parts}{more})" if parts else f" ({len(lag)} partitions)")


def format_status(prev: Optional[Snapshot], cur: Snapshot) -> str:
    """One line. The rate is over the interval since ``prev`` (none on the first line)."""
    rate = ""
    if prev is not None and cur.t > prev.t:
        rate = f" ({(cur.events_in - prev.events_in) / (cur.t - prev.t):,.0f}/s)"
    parts = [f"events {cur.events_in:,} in{rate}", f"rows {cur.rows_written:,} written",
             f"aggregates {cur.aggregates_written:,}", f"dead letters {cur.dead_letters:,}",
             f"duplicates {cur.duplicates:,}", f"state keys {cur.state_keys:,}"]
    if cur.kafka_lag is not None:
        parts.append(_lag_text(cur.kafka_lag))
    return " · ".join(parts)


class KafkaLag:
    """Committed lag per partition of every Kafka source of a contract: one consumer per source that
    reads the group's committed offsets and the end offsets; it never subscribes, so it does not join
    the group and the job's consumers are not disturbed."""

    def __init__(self, contract, timeout_s: float = 3.0):
        from ingest.contract import KafkaSource

        self._sources = [s for p in contract.partners for s in p.sources if isinstance(s, KafkaSource)]
        self._timeout_ms = int(timeout_s * 1000)
        self._clients: list = []

    def __bool__(self) -> bool:
        return bool(self._sources)

    def _open(self) -> None:
        from kafka import KafkaConsumer

        for s in self._sources:
            self._clients.append((s, KafkaConsumer(bootstrap_servers=s.bootstrap_servers.split(","),
                                                   group_id=s.group_id, client_id="headwater-status",
                                                   enable_auto_commit=False, request_timeout_ms=self._timeout_ms)))

    def __call__(self) -> Optional[dict]:
        import re

        from kafka import TopicPartition

        try:
            if not self._clients:
                self._open()
            lag: dict = {}
            for spec, consumer in self._clients:
                topics = consumer.topics()
                if spec.topic_pattern:
                    rx = re.compile(spec.topic_pattern)
                    names = sorted(t for t in topics if rx.fullmatch(t))
                else:
                    names = [t for t in spec.topics if t in topics]
                tps = [TopicPartition(t, p) for t in names for p in sorted(consumer.partitions_for_topic(t) or ())]
                ends = self._timed(consumer.end_offsets, tps)
                for tp in tps:
                    done = self._timed(consumer.committed, tp)
                    lag[f"{tp.topic}/{tp.partition}"] = max(0, ends.get(tp, 0) - (done or 0))
            return lag
        except Exception:  # noqa: BLE001 - the status line shows no lag rather than failing the run
            return None

    def _timed(self, fn, arg):
        try:
            return fn(arg, timeout_ms=self._timeout_ms)
        except TypeError:  # kafka-python < 3 has no per-call timeout (request_timeout_ms still bounds it)
            return fn(arg)

    def close(self) -> None:
        for _, consumer in self._clients:
            try:
                consumer.close(autocommit=False)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self._clients = []


class StatusLine:
    """A daemon thread redrawing the status line every ``every_s`` seconds while a job runs.

    ``start()`` does nothing (returns False) when ``out`` is not a terminal. ``stop()`` draws the
    last line and joins the thread.
    """

    def __init__(self, every_s: float = DEFAULT_EVERY_S, out: Optional[TextIO] = None,
                 kafka_lag: Optional[Callable[[], Optional[dict]]] = None,
                 clock: Callable[[], float] = time.monotonic):
        import sys

        self._every = max(0.5, float(every_s))
        self._out = out if out is not None else sys.stdout
        self._lag = kafka_lag
        self._clock = clock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._live = None

    def start(self) -> bool:
        isatty = getattr(self._out, "isatty", None)
        if not (callable(isatty) and isatty()):
            return False
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        console = Console(file=self._out, force_terminal=True)
        self._live = Live(Text("headwater: starting ..."), console=console, auto_refresh=False, transient=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()
        self._thread = threading.Thread(target=self._loop, name="headwater-status", daemon=True)
        self._thread.start()
        return True

    def _draw(self, prev: Optional[Snapshot]) -> Snapshot:
        from rich.text import Text

        cur = collect(self._clock(), kafka_lag=self._lag() if self._lag else None)
        assert self._live is not None
        self._live.update(Text(format_status(prev, cur)), refresh=True)
        return cur

    def _loop(self) -> None:
        self._prev = collect(self._clock())
        while not self._stop.wait(self._every):
            self._prev = self._draw(self._prev)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._live is not None:
            self._draw(getattr(self, "_prev", None))  # the last figures stay on screen
            self._live.stop()
            self._live = None
        close = getattr(self._lag, "close", None)
        if callable(close):
            close()
