"""ParseEnvelope: RawMessage -> (Event, DeadLetter), masking first. Thin DoFn over ``ingest.envelope``."""
from __future__ import annotations

import logging
import time
from typing import Mapping

import apache_beam as beam
from apache_beam.metrics import Metrics

from flatten.fast import FastFlattener
from flatten.mask import Masker
from flatten.options import FlattenOptions
from flatten.records import DeadLetter, Event, RawMessage, Reason
from ingest.contract import Contract
from ingest import progress
from ingest.mask_key import contract_mask_key
from ingest.envelope import EnvelopeParser

__all__ = ["ParseEnvelope", "DEAD_LETTER_TAG"]

DEAD_LETTER_TAG = "dead_letter"
_LOG = logging.getLogger(__name__)


class _ParseFn(beam.DoFn):
    def __init__(self, contract: Contract, step: str):
        self._contract = contract
        self._step = step
        self._parsers: Mapping[str, EnvelopeParser] = {}
        self._events = Metrics.counter("headwater", "events_parsed")
        self._dead = Metrics.counter("headwater", "dead_letters_parse")
        # payloads the compiled envelope path did not take (dead letters, epoch times, attribute locators, ...)
        self._py_events = Metrics.counter("headwater", "envelope_python_path_events")

    def setup(self) -> None:
        m = self._contract.masking
        key = contract_mask_key(m)  # Secret Manager on Dataflow workers (ingest/mask_key.py); never an option
        self._refs = Masker([], key)  # keyed payload refs for messages of unknown partners
        # the compiled accelerator (flatten.fast) takes well-formed events when built; Python decides the rest
        self._parsers = {
            p.name: EnvelopeParser(p.envelope, Masker(p.columns, key), step=self._step,
                                   native=FastFlattener(FlattenOptions(), p.columns, key))
            for p in self._contract.partners
        }

    def process(self, msg: RawMessage):
        now_us = int(time.time() * 1_000_000)
        progress.count_parsed()
        parser = self._parsers.get(msg.partner)
        if parser is None:
            self._dead.inc()
            # Unknown partner means no masking policy is known: keep only a reference, never the bytes.
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(
                partner=msg.partner, source=msg.source, coords=msg.coords, payload=b"",
                payload_ref=self._refs.payload_ref(msg.payload), error_class="ConfigError", reason=Reason.UNKNOWN_PARTNER,
                message=f"no partner {msg.partner!r} in the contract", step=self._step, event_time_us=None,
                processing_time_us=now_us))
            return
        before = parser.python_events
        out = parser.parse(msg, now_us)
        if parser.python_events != before:
            self._py_events.inc()
        if isinstance(out, Event):
            self._events.inc()
            # Keeps the source's timestamp (arrival side of the watermark) until after dedup:
            # DropDuplicateEvents' expiry timers must be relative to it (see ingest.dedup).
            yield out
        else:
            self._dead.inc()
            Metrics.counter("headwater", f"dead_letter_{out.reason}").inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, out)


class ParseEnvelope(beam.PTransform):
    """PCollection[RawMessage] -> DoOutputsTuple(events=PCollection[Event] (source timestamps kept),
    dead_letter=PCollection[DeadLetter]).

    Every message becomes exactly one of the two. Payloads are masked before
    anything else sees them; unparseable payloads of partners with annotations
    are stored encrypted in the dead letter.
    """

    def __init__(self, contract: Contract, label: str = "ParseEnvelope"):
        super().__init__(label)
        self._contract = contract

    def expand(self, pcoll):
        return pcoll | "Parse" >> beam.ParDo(_ParseFn(self._contract, self.label)).with_output_types(
            Event, **{DEAD_LETTER_TAG: DeadLetter}).with_outputs(DEAD_LETTER_TAG, main="events")
