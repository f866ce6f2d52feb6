"""Typed aggregate declarations (part of the partner contract). No Beam import."""
from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["MetricSpec", "AggregateSpec", "parse_duration_s"]

_DUR = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(value: str | int | float) -> float:
    """'90s', '5m', '1h', '30d', '250ms' or a number of seconds -> seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    m = _DUR.match(str(value))
    if not m:
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 5m, 1h, 7d)")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


_FNS_NEEDING_COLUMN = {"sum", "min", "max", "avg", "distinct", "latest"}
_FNS = _FNS_NEEDING_COLUMN | {"count", "first_seen", "last_seen"}


class MetricSpec(_Frozen):
    name: str = Field(pattern=r"^[a-z_][a-z0-9_]*$", description="Output metric name.")
    fn: str = Field(description="count | sum | min | max | avg | distinct | first_seen | last_seen | latest")
    column: Optional[str] = Field(None, description="Flattened column the metric reads (not for count/first_seen/last_seen).")

    @model_validator(mode="after")
    def _check(self) -> "MetricSpec":
        if self.fn not in _FNS:
            raise ValueError(f"unknown metric fn {self.fn!r}; one of {sorted(_FNS)}")
        if self.fn in _FNS_NEEDING_COLUMN and not self.column:
            raise ValueError(f"metric {self.name!r}: fn {self.fn!r} needs 'column'")
        return self


class AggregateSpec(_Frozen):
    """A per-key aggregate computed in the stream with Beam state and timers."""

    name: str = Field(pattern=r"^[a-z_][a-z0-9_]*$")
    key: str = Field("user_id", description="'user_id' (envelope user id) or any flattened column.")
    metrics: tuple[MetricSpec, ...]
    windows: tuple[str, ...] = Field(("lifetime",), description="'lifetime' and/or sliding event-time windows such as '1d', '7d', '30d'.")
    emit_every: str = Field("60s", description="Processing-time emission cadence.")
    allowed_lateness: str = Field("1h", description="Events older than the watermark minus this go to dead letters (reason 'late').")
    ttl: str = Field("30d", description="State of a key silent for this long (event time) is cleared.")
    distinct_exact_threshold: int = Field(1000, ge=1, description="Distinct counts are exact up to this many values, HyperLogLog beyond.")

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one window")
        for w in v:
            if w != "lifetime":
                parse_duration_s(w)
        if len(set(v)) != len(v):
            raise ValueError("duplicate windows")
        return v

    @field_validator("emit_every", "allowed_lateness", "ttl")
    @classmethod
    def _dur(cls, v: str) -> str:
        parse_duration_s(v)
        return v

    @model_validator(mode="after")
    def _names(self) -> "AggregateSpec":
        names = [m.name for m in self.metrics]
        if not names:
            raise ValueError("at least one metric")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate metric names in {names}")
        return self
