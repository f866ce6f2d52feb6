"""Parse, mask, envelope and flatten a whole batch of raw messages in one call. Pure (no Beam).

``ingest.bounded``'s ``ProcessBatches`` DoFn is a thin wrapper: Beam's per-element cost is then paid
per batch (about a thousand records) instead of per record and per step. For every message the
result is exactly what ``ParseEnvelope`` followed by ``FlattenEvents`` produce for it
(``tests/ingest/test_batch.py`` checks this differentially, hostile payloads included):

* where the compiled accelerator takes the event (well-formed, envelope paths in the payload, ISO
  event time, nesting provably within ``max_nesting``), one native call does parse + mask +
  envelope + flatten (``FastFlattener.native_event_fn``), instead of two parses; a run of one
  partner's messages goes through the accelerator's own loop (``FastFlattener.native_run_fn``),
  which builds the ``TableRow``s and the ``Entry`` as the Python loop below does and hands that loop
  every message it does not finish itself;
* everything else goes through the very objects the per-element steps use
  (``EnvelopeParser.parse``, then ``FastFlattener.rows``), dead letters included, with the same
  step names in them (``ParseEnvelope``, ``FlattenEvents``).

Aggregate inputs are returned per accepted event as compact tuples (``Entry``), ready for the
bounded dedup + combine (``ingest.bounded``), with the values of the columns each aggregate reads:
on the fused path the native call returns them itself (``want``: the main-row values exactly as
``orjson.loads(main_row).get(column)`` gives them), else (or when it cannot) the main row is loaded here.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Optional, Sequence

import orjson

from flatten.core import FlattenError
from flatten.fast import FastFlattener
from flatten.mask import Masker
from flatten.options import FlattenOptions
from flatten.records import DeadLetter, Event, RawMessage, Reason, TableRow
from ingest.contract import Contract, PartnerContract
from ingest.envelope import EnvelopeParser
from ingest.mask_key import contract_mask_key

new_tuple = tuple.__new__

#: Whether a run of one partner's messages goes through the accelerator's loop (``process_run``: no Python frame
#: per event) or this module's loop calling it per event; both give the same results (tests/ingest/test_batch.py).
#: For comparisons (bench/README.md).
NATIVE_RUN = True

__all__ = ["BatchProcessor", "BatchResult", "Entry", "PARSE_STEP", "FLATTEN_STEP", "metric_columns"]

#: Step names written into dead letters: the per-element pipeline's, so the dead-letter table reads the same.
PARSE_STEP = "ParseEnvelope"
FLATTEN_STEP = "FlattenEvents"


class Entry(NamedTuple):
    """One accepted event, for dedup and aggregates: ``aggs`` holds ``(aggregate index, key, values tuple)``
    per aggregate of the partner whose key was present (values in ``metric_columns`` order); ``rows`` the
    event's rows when the caller asked to carry them (``BatchProcessor(keep_rows=True)``), else None."""

    event_id: str
    event_time_us: int
    aggs: tuple
    rows: Optional[tuple]


class BatchResult(NamedTuple):
    rows: list  # TableRow
    dead: list  # DeadLetter
    entries: list  # Entry (one per accepted event)
    python_envelope: int  # events the envelope parser handled in Python (not the fused native call)
    python_flatten: int
    key_missing: int  # aggregate inputs skipped: the event had no usable aggregate key


def metric_columns(spec) -> tuple[str, ...]:
    """The columns an aggregate's metrics read, in a stable order (the values tuples follow it)."""
    cols: list[str] = []
    for m in spec.metrics:
        if m.column and m.column not in cols:
            cols.append(m.column)
    return tuple(cols)


class _Partner:
    """Everything compiled for one partner (built once per worker)."""

    def __init__(self, p: PartnerContract, key: bytes, native_values: bool = True):
        env = p.envelope
        self.name = p.name
        self.table = p.table.name
        self.env = env
        self.parser = EnvelopeParser(env, Masker(p.columns, key), step=PARSE_STEP,
                                     native=FastFlattener(FlattenOptions(), p.columns, key))
        self.flattener = FastFlattener(p.flatten)
        self.aggs = tuple((a.key, metric_columns(a)) for a in p.aggregates)
        attrs = any(loc.startswith("attribute:") for loc in (env.event_id, env.user_id, env.event_time))
        fused = run = None
        if not attrs and env.event_time_format in ("auto", "iso8601"):
            # the same conditions under which EnvelopeParser uses its compiled envelope
            ff = FastFlattener(p.flatten, p.columns, key)
            fused, run = ff.native_event_fn, ff.native_run_fn
        self.fused = fused
        self.paths = (env.event_id, env.user_id, env.event_time)
        # the main-row columns the aggregates read (keys other than user_id, then metric columns), once each;
        # per aggregate, the key's index in them (None: user_id) and the metric columns' indices (None: all,
        # in order: the values tuple itself)
        want: list[str] = []
        for key_col, cols in self.aggs:
            for c in ((key_col,) if key_col != "user_id" else ()) + cols:
                if c not in want:
                    want.append(c)
        self.want = tuple(want)
        self.agg_index = tuple(
            (None if key_col == "user_id" else want.index(key_col),
             None if cols == self.want else tuple(want.index(c) for c in cols))
            for key_col, cols in self.aggs)
        self.fused_args = (*self.paths, self.want) if self.aggs and native_values else self.paths
        self.max_bytes = env.max_payload_bytes
        self.max_nesting = env.max_nesting
        self.tables: dict[str, str] = {"": self.table}  # flattener sub-table path -> warehouse table name
        # the native loop over a run of this partner's messages (BatchProcessor.process); not where the
        # aggregate values are read from the main row in Python anyway (native_values=False: tests compare)
        self.run = run if (NATIVE_RUN and run is not None and (native_values or not self.aggs)) else None
        self.run_args = (self.paths, self.want if self.aggs else None, self.max_bytes, self.max_nesting,
                         self.tables, self.table_of, TableRow, Entry, self.agg_index)

    def table_of(self, sub: str) -> str:
        name = self.tables[sub] = f"{self.table}__{sub}"
        return name


class BatchProcessor:
    """Compiled once per worker for a contract; ``process(messages)`` handles one batch of one partner or more.

    Not thread-safe (like the flatteners it holds): one per DoFn instance.
    """

    def __init__(self, contract: Contract, keep_rows: bool = False, native_values: bool = True):
        # native_values=False: aggregate inputs always from orjson.loads of the main row (tests compare)
        m = contract.masking
        key = contract_mask_key(m)  # Secret Manager (key_secret), env var, file or dev key
        self._partners = {p.name: _Partner(p, key, native_values) for p in contract.partners}
        self._refs = Masker([], key)  # keyed payload refs (hmac-sha256:), as ParseEnvelope makes them
        self._keep_rows = keep_rows

    def process(self, messages: Sequence[RawMessage], now_us: Optional[int] = None) -> BatchResult:
        now_us = int(time.time() * 1_000_000) if now_us is None else now_us
        rows: list = []
        dead: list = []
        entries: list = []
        py_env = py_flat = nokey = 0
        keep_rows = self._keep_rows
        loads = orjson.loads
        if type(messages) is not list:
            messages = list(messages)
        n = len(messages)
        at = 0
        while at < n:
            msg = messages[at]
            pc = self._partners.get(msg.partner)
            tried = False
            if pc is not None and pc.run is not None:
                # the native loop takes the run of this partner's messages it can finish itself (rows and entries
                # exactly as below); it stops at a message it leaves to this loop, or at another partner's
                at, missing, code, out = pc.run(messages, at, msg.partner, *pc.run_args, keep_rows, rows, entries)
                nokey += missing
                if code == 0:  # the end, or messages[at] is another partner's: look it up
                    continue
                msg, tried = messages[at], True  # code 1: out is None (the Python path); 2: the native result
            at += 1
            if pc is None:
                # Unknown partner means no masking policy is known: keep only a reference, never the bytes.
                dead.append(DeadLetter(
                    partner=msg.partner, source=msg.source, coords=msg.coords, payload=b"",
                    payload_ref=self._refs.payload_ref(msg.payload), error_class="ConfigError", reason=Reason.UNKNOWN_PARTNER,
                    message=f"no partner {msg.partner!r} in the contract", step=PARSE_STEP, event_time_us=None,
                    processing_time_us=now_us))
                continue
            payload = msg.payload
            if not tried:
                out = None
            vals = None
            if not tried and pc.fused is not None and len(payload) <= pc.max_bytes and \
                    payload.count(b"{") + payload.count(b"[") <= pc.max_nesting:
                # Depth can only exceed max_nesting with more than max_nesting opening brackets; below
                # that the fused call cannot accept what ParseEnvelope would dead-letter as too deep.
                out = pc.fused(payload, *pc.fused_args)
            if out is not None:
                if len(out) == 5:  # with the aggregates' main-row values (None: not decoded natively)
                    event_id, user_id, t_us, ev_rows, vals = out
                else:
                    event_id, user_id, t_us, ev_rows = out
            else:
                py_env += 1
                parsed = pc.parser.parse(msg, now_us)
                if not isinstance(parsed, Event):
                    dead.append(parsed)
                    continue
                event_id, user_id, t_us = parsed.event_id, parsed.user_id, parsed.event_time_us
                flattener = pc.flattener
                before = flattener.python_events
                try:
                    ev_rows = flattener.rows(parsed.doc, event_id, user_id, t_us)
                except (FlattenError, RecursionError, ValueError, TypeError) as exc:
                    dead.append(DeadLetter(
                        partner=msg.partner, source=msg.source, coords=msg.coords, payload=parsed.doc,
                        payload_ref=self._refs.payload_ref(parsed.doc), error_class=type(exc).__name__,
                        reason=Reason.FLATTEN_ERROR,
                        message=(f"{exc.reason}: " if isinstance(exc, FlattenError) else "") + str(exc)[:1000],
                        step=FLATTEN_STEP, event_time_us=t_us, processing_time_us=now_us))
                    continue
                py_flat += flattener.python_events - before
            tables = pc.tables
            partner = msg.partner
            # tuple.__new__: a NamedTuple's own __new__ is a Python function (~0.5 us per event at 2.5 rows)
            trows = [new_tuple(TableRow, (partner, tables[sub] if sub in tables else pc.table_of(sub), row_id,
                                          event_id, t_us, cols, types)) for sub, row_id, cols, types in ev_rows]
            if not keep_rows:
                rows += trows
            aggs: list = []
            if pc.aggs:
                if vals is None:  # the Python path, or the native call could not decode them exactly
                    main = loads(ev_rows[0][2]) if pc.want else {}
                    vals = tuple([main.get(c) for c in pc.want])
                for i, (k, idx) in enumerate(pc.agg_index):
                    key = user_id if k is None else vals[k]
                    if key is None or isinstance(key, (list, dict)):
                        nokey += 1
                        continue
                    aggs.append((i, str(key), vals if idx is None else tuple([vals[j] for j in idx])))
            entries.append(Entry(event_id, t_us, tuple(aggs), tuple(trows) if keep_rows else None))
        return BatchResult(rows, dead, entries, py_env, py_flat, nokey)
