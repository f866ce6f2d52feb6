"""Source labels and construction: one stable label per configured source.

Labels are ``Read_<partner>_<kind>_<n>`` (n counts sources of that kind for the
partner), so reordering different kinds in the contract does not rename steps,
and tests swap a source for an in-memory one by its label.
"""
from __future__ import annotations

from typing import Iterator

import apache_beam as beam

from ingest.contract import FileSource, KafkaSource, PartnerContract, PubSubSource

__all__ = ["source_labels", "ReadSource"]


def source_labels(partner: PartnerContract) -> Iterator[tuple[str, object]]:
    seen: dict[str, int] = {}
    for spec in partner.sources:
        n = seen.get(spec.kind, 0)
        seen[spec.kind] = n + 1
        yield f"Read_{partner.name}_{spec.kind}_{n}", spec


class ReadSource(beam.PTransform):
    """PBegin -> (PCollection[RawMessage], PCollection[DeadLetter] | None) for one configured source."""

    def __init__(self, spec: object, partner: PartnerContract, label: str):
        super().__init__(label)
        self._spec = spec
        self._partner = partner

    def expand(self, pbegin):
        spec = self._spec
        if isinstance(spec, FileSource):
            from ingest.file_source import ReadPartnerFiles

            return pbegin | "Files" >> ReadPartnerFiles(spec, self._partner.name,
                                                          self._partner.envelope.max_payload_bytes, step=self.label)
        if isinstance(spec, KafkaSource):
            from ingest.kafka_source import ReadFromKafkaPy

            return pbegin | "Kafka" >> ReadFromKafkaPy(spec, self._partner.name), None
        if isinstance(spec, PubSubSource):
            from ingest.pubsub_source import ReadFromPartnerPubSub

            return pbegin | "PubSub" >> ReadFromPartnerPubSub(spec, self._partner.name), None
        raise TypeError(f"unknown source spec {type(spec).__name__}")
