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
    hll_precision: int = Field(12, ge=4, le=16, description="HyperLogLog precision p (2**p registers); relative standard error 1.04/sqrt(2**p), 1.6% at p=12.")
    window_bucket: Optional[str] = Field(None, description="Bucket size of sliding windows in state (e.g. '1h'); default: the coarsest of 1d/1h/1m/1s giving at least 6 buckets per window and dividing every window.")

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
        sliding = self.sliding_windows_s()
        ttl = parse_duration_s(self.ttl)
        if sliding and ttl < max(sliding.values()):
            raise ValueError(f"aggregate {self.name!r}: ttl {self.ttl!r} is shorter than the longest window; state would be cleared inside it")
        if ttl <= parse_duration_s(self.allowed_lateness):
            raise ValueError(f"aggregate {self.name!r}: ttl {self.ttl!r} must be longer than allowed_lateness {self.allowed_lateness!r}")
        if parse_duration_s(self.allowed_lateness) < 1 or parse_duration_s(self.emit_every) < 0.001:
            raise ValueError(f"aggregate {self.name!r}: allowed_lateness must be >= 1s and emit_every > 0")
        for w, n in sliding.items():
            if n < 1 or n != int(n):
                raise ValueError(f"aggregate {self.name!r}: window {w!r} must be a whole number of seconds >= 1s")
        self.bucket_s()  # validates window_bucket
        return self

    def sliding_windows_s(self) -> dict[str, float]:
        """Sliding windows (all but 'lifetime') -> length in seconds."""
        return {w: parse_duration_s(w) for w in self.windows if w != "lifetime"}

    def bucket_s(self) -> Optional[int]:
        """Bucket size (seconds) of the sliding windows' state, or None when there are none."""
        sliding = [int(v) for v in self.sliding_windows_s().values()]
        if not sliding:
            return None
        if self.window_bucket is not None:
            b = parse_duration_s(self.window_bucket)
            if b < 1 or b != int(b) or any(n % int(b) for n in sliding):
                raise ValueError(f"aggregate {self.name!r}: window_bucket {self.window_bucket!r} must be whole seconds dividing every window {sorted(self.sliding_windows_s())}")
            return int(b)
        for unit in (86400, 3600, 60, 1):
            if all(n % unit == 0 and n // unit >= 6 for n in sliding):
                return unit
        return 1
