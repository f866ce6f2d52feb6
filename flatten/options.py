"""Typed options for flattening and masking (part of the partner contract).

Pure pydantic models, no Beam. ``ingest.contract`` composes them into the
partner contract; each field's docstring is the contract's documentation.
"""
from __future__ import annotations

import re
from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["SchemaMode", "PiiPolicy", "ColumnAnnotation", "FlattenOptions"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SchemaMode(str, Enum):
    """What happens when a value does not fit its column's established type."""

    EVOLVE = "evolve"  #: store it in a variant column ``<col>__v_<type>``
    FREEZE = "freeze"  #: dead-letter the event, naming the column and both types
    DISCARD_VALUE = "discard_value"  #: store NULL for that value, keep the row


class PiiPolicy(str, Enum):
    HASH = "hash"  #: keyed HMAC-SHA256 (hex)
    TOKENIZE = "tokenize"  #: deterministic token ``tok_<...>``, joins across tables/partners
    REDACT = "redact"  #: fixed mask keeping a format hint (e.g. last 4 chars)
    DROP = "drop"  #: column removed entirely


class ColumnAnnotation(_Frozen):
    """A sensitive-column annotation from the partner's contract."""

    path: str = Field(
        description="Dotted path into the event; '*' matches any key(s), "
        "'[]' any list element: 'user.ssn', 'user.*.ssn', 'accounts[].number'. Matched by column-name tokens "
        "whatever the shape on the way (literal dotted keys, objects for lists, lists of lists; docs/flatten.md)."
    )
    pii: PiiPolicy
    keep_last: int = Field(4, ge=0, le=16, description="redact: trailing characters kept.")
    pattern: Optional[str] = Field(
        None, description="Regular expression matching this field's RAW values (e.g. '\\d{3}-\\d{2}-\\d{4}'): "
        "`headwater audit` reports any warehouse value, dead letter or log line it matches. Default: by the "
        "path's name (ssn, email, card/pan, iban, phone ...); see docs/flatten.md.")

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"pattern {v!r} is not a regular expression: {exc}") from None
        return v

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, v: str) -> str:
        if not v.strip() or v.startswith(".") or v.endswith(".") or ".." in v:
            raise ValueError(f"invalid column path {v!r}")
        if not any(seg.replace("[]", "") for seg in v.split(".")):
            raise ValueError(f"invalid column path {v!r}: no key")
        return v


class FlattenOptions(_Frozen):
    """How a partner's nested events become rows."""

    max_depth: int = Field(
        16, ge=1, le=64, description="Nesting depth flattened into columns; deeper content is kept as a JSON column."
    )
    scalar_arrays: str = Field(
        "repeated", pattern="^(repeated|child)$",
        description="Arrays of scalars: 'repeated' column (BigQuery REPEATED) or child table rows.",
    )
    timestamp_columns: tuple[str, ...] = Field(
        (), description="Flattened column names always parsed as TIMESTAMP (ISO-8601 strings, "
        "or epoch numbers with the unit chosen by magnitude). Child-table columns are named '<table>__<column>'."
    )
    detect_timestamps: bool = Field(
        True, description="Infer TIMESTAMP/DATE from ISO-8601 looking strings in other columns."
    )
    no_timestamp_columns: tuple[str, ...] = Field(
        (), description="Flattened column names never inferred as TIMESTAMP/DATE (kept STRING) even with detect_timestamps. "
        "Child-table columns are named '<table>__<column>', e.g. 'items__created_at'.",
    )
    schema_mode: SchemaMode = Field(SchemaMode.EVOLVE, description="Type-conflict policy.")
