"""The partner contract: one YAML file, many partners, loaded into typed config.

``load_contract(path)`` returns a frozen :class:`Contract` or raises
:class:`ContractError` whose message names the partner and the field, e.g.::

    contract examples/headwater.yaml: partner 'acme_bank': sources[0].subscription: ...

Onboarding a partner is adding an entry here; no code changes.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flatten.options import ColumnAnnotation, FlattenOptions
from sinks.spec import TableSpec, WarehouseSpec
from state.spec import AggregateSpec

__all__ = [
    "ContractError",
    "FileSource",
    "PubSubSource",
    "KafkaSource",
    "SourceSpec",
    "EnvelopeSpec",
    "PartnerContract",
    "MaskingSpec",
    "DedupSpec",
    "Contract",
    "load_contract",
    "parse_contract",
]


class ContractError(ValueError):
    """Invalid contract: raised before any pipeline is built. Terminal (do not retry)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileSource(_Frozen):
    """Bounded files (local path, gs:// or s3:// glob) of JSONL, JSONL.gz or Avro."""

    kind: Literal["file"]
    pattern: str = Field(description="Glob: ./data/*.jsonl.gz, gs://bucket/acme/2026-*.avro, s3://...")
    format: Literal["auto", "jsonl", "avro"] = Field("auto", description="'auto' picks by extension (.avro -> avro, else JSONL; .gz is decompressed).")


class PubSubSource(_Frozen):
    """An unbounded Pub/Sub subscription."""

    kind: Literal["pubsub"]
    subscription: str = Field(pattern=r"^projects/[a-z][a-z0-9-]{3,}[a-z0-9]/subscriptions/[A-Za-z][A-Za-z0-9_.~+%-]{2,254}$")
    topic: Optional[str] = Field(None, pattern=r"^projects/[a-z][a-z0-9-]{3,}[a-z0-9]/topics/[A-Za-z][A-Za-z0-9_.~+%-]{2,254}$",
                                 description="Topic the subscription reads (used by 'headwater publish' and to create the subscription locally).")
    timestamp_attribute: Optional[str] = Field(None, description="Attribute holding the event time (RFC 3339 or epoch ms), Beam's timestamp_attribute.")
    id_attribute: Optional[str] = Field(None, description="Attribute holding a unique event id, Beam's id_label.")


class KafkaSource(_Frozen):
    """An unbounded Kafka topic set, read with kafka-python."""

    kind: Literal["kafka"]
    bootstrap_servers: str = Field("127.0.0.1:9092")
    topics: tuple[str, ...] = Field((), description="Explicit topics.")
    topic_pattern: Optional[str] = Field(None, description="Regex of topics (alternative to 'topics').")
    group_id: str = Field(description="Consumer group; offsets are committed after the runner durably took the records.")
    start: str = Field("committed", description="committed | earliest | latest | timestamp:<RFC3339>")

    @model_validator(mode="after")
    def _check(self) -> "KafkaSource":
        if bool(self.topics) == bool(self.topic_pattern):
            raise ValueError("exactly one of 'topics' or 'topic_pattern' must be given")
        if self.topic_pattern:
            try:
                re.compile(self.topic_pattern)
            except re.error as exc:
                raise ValueError(f"topic_pattern is not a valid regex: {exc}") from exc
        if not (self.start in ("committed", "earliest", "latest") or self.start.startswith("timestamp:")):
            raise ValueError("start must be committed | earliest | latest | timestamp:<RFC3339>")
        return self


SourceSpec = Annotated[Union[FileSource, PubSubSource, KafkaSource], Field(discriminator="kind")]

_LOCATOR = re.compile(r"^(attribute:[\w.-]+|[^\s]+)$")


class EnvelopeSpec(_Frozen):
    """Where the envelope fields live: a dotted path into the payload, or ``attribute:<name>``."""

    event_id: str = Field("id", description="Path or attribute:<name>; a stable event id (dedup key).")
    user_id: str = Field("user.id", description="Path or attribute:<name>; required on every event.")
    event_time: str = Field("timestamp", description="Path or attribute:<name>.")
    event_time_format: Literal["auto", "iso8601", "epoch_s", "epoch_ms", "epoch_us"] = "auto"
    max_payload_bytes: int = Field(1_048_576, ge=64, le=100 * 1024 * 1024)
    max_nesting: int = Field(64, ge=1, le=512, description="Events nested deeper are dead-lettered (reason too_deep).")

    @field_validator("event_id", "user_id", "event_time")
    @classmethod
    def _loc(cls, v: str) -> str:
        if not _LOCATOR.match(v) or v.startswith(".") or v.endswith(".") or ".." in v:
            raise ValueError(f"invalid locator {v!r}")
        return v


class PartnerContract(_Frozen):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,62}$", description="Partner id (lowercase, used in table names).")
    sources: tuple[SourceSpec, ...] = Field(min_length=1)
    envelope: EnvelopeSpec = EnvelopeSpec()
    flatten: FlattenOptions = FlattenOptions()
    columns: tuple[ColumnAnnotation, ...] = Field((), description="Sensitive-column annotations.")
    table: TableSpec
    aggregates: tuple[AggregateSpec, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> "PartnerContract":
        names = [a.name for a in self.aggregates]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate aggregate names {names}")
        paths = [c.path for c in self.columns]
        if len(set(paths)) != len(paths):
            raise ValueError(f"a column path is annotated twice in {paths}")
        return self


class MaskingSpec(_Frozen):
    """Where the masking key comes from. The key itself never appears in config or logs."""

    key_env: str = Field("HEADWATER_MASK_KEY", description="Environment variable holding the HMAC key.")
    key_file: Optional[str] = Field(None, description="File holding the key (used when the variable is unset).")
    allow_dev_key: bool = Field(False, description="Use a fixed development key when neither is set (demo/tests only).")
    key_secret: Optional[str] = Field(
        None, pattern=r"^projects/[^/\s]+/secrets/[A-Za-z0-9_-]{1,255}/versions/([0-9]+|latest)$",
        description="Secret Manager secret version holding the key, read by each worker in DoFn.setup "
                    "(Dataflow): projects/P/secrets/S/versions/V. Used first when set.")


class DedupSpec(_Frozen):
    """How long an event id is remembered by DropDuplicateEvents (after its arrival)."""

    window: str = Field("1d", description="Duration (e.g. 1d, 12h): duplicates arriving later than this pass.")

    @field_validator("window")
    @classmethod
    def _window(cls, v: str) -> str:
        from state.spec import parse_duration_s

        if parse_duration_s(v) < 1:
            raise ValueError("dedup window must be at least 1s")
        return v

    def window_s(self) -> float:
        from state.spec import parse_duration_s

        return parse_duration_s(self.window)


class Contract(_Frozen):
    version: Literal[1] = 1
    warehouse: WarehouseSpec = WarehouseSpec()
    masking: MaskingSpec = MaskingSpec()
    dedup: DedupSpec = DedupSpec()
    partners: tuple[PartnerContract, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Contract":
        names = [p.name for p in self.partners]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate partner names {dups}")
        return self

    def partner(self, name: str) -> PartnerContract:
        for p in self.partners:
            if p.name == name:
                return p
        raise ContractError(f"no partner {name!r} in contract (have: {[p.name for p in self.partners]})")

    @property
    def streaming(self) -> bool:
        return any(s.kind in ("pubsub", "kafka") for p in self.partners for s in p.sources)


def _fmt_loc(loc: tuple, raw: dict) -> str:
    """Turn a pydantic error location into 'partner 'x': field.path'."""
    parts = list(loc)
    prefix = ""
    if len(parts) >= 2 and parts[0] == "partners" and isinstance(parts[1], int):
        idx = parts[1]
        name = None
        try:
            name = raw["partners"][idx].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        prefix = f"partner {name!r}: " if name else f"partners[{idx}]: "
        parts = parts[2:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("file", "pubsub", "kafka") and out.endswith("]"):
            continue  # discriminator tag adds no information
        else:
            out += ("." if out else "") + str(p)
    return prefix + (out or "<root>")


def parse_contract(raw: object, origin: str = "<contract>") -> Contract:
    if not isinstance(raw, dict):
        raise ContractError(f"contract {origin}: top level must be a mapping with 'partners'")
    try:
        return Contract.model_validate(raw)
    except ValidationError as exc:
        lines = [f"contract {origin}: {len(exc.errors())} error(s)"]
        for err in exc.errors():
            lines.append(f"  {_fmt_loc(tuple(err['loc']), raw)}: {err['msg']}")
        raise ContractError("\n".join(lines)) from None


def load_contract(path: str | Path) -> Contract:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ContractError(f"contract {p}: cannot read: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ContractError(f"contract {p}: invalid YAML: {exc}") from None
    return parse_contract(raw, str(p))
