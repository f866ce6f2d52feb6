"""What an operator asked a backfill to do: typed, validated at launch (no Beam, no I/O).

``BackfillSpec`` is built from ``headwater backfill plan|run`` arguments. Bad values fail
before anything is listed or written, with a message naming the flag
(``--to: must be after --from``), and the CLI turns that into exit code 2.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["BackfillSpec", "Mode", "parse_instant_us", "format_us", "GRANULARITY_US", "is_aligned"]

Mode = Literal["fill", "replace", "columns"]
_ID = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
GRANULARITY_US = {"HOUR": 3_600_000_000, "DAY": 86_400_000_000}


def parse_instant_us(text: str, flag: str) -> int:
    """``2026-03-01`` or an RFC 3339 instant (``2026-03-01T12:00:00Z``) -> microseconds since the epoch (UTC)."""
    s = text.strip()
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a date (2026-03-01) or an RFC 3339 instant") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def format_us(us: Optional[int]) -> str:
    if us is None:
        return "-"
    dt = datetime.fromtimestamp(us / 1_000_000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ") if us % 86_400_000_000 else dt.strftime("%Y-%m-%d")


def is_aligned(us: int, granularity: str) -> bool:
    """Whether ``us`` starts a partition of ``granularity`` (MONTH/YEAR: first instant of a month/year)."""
    if granularity in GRANULARITY_US:
        return us % GRANULARITY_US[granularity] == 0
    dt = datetime.fromtimestamp(us / 1_000_000, tz=timezone.utc)
    start = dt.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if granularity == "YEAR":
        start = start.replace(month=1)
    return dt == start


class BackfillSpec(BaseModel):
    """One backfill: which partner, which chunks, which event-time range, and what to do with rows already there.

    * ``fill`` (default): insert rows whose ``_row_id`` is absent; existing rows untouched.
    * ``replace``: every partition in ``[start, end)`` becomes exactly what the backfill produced
      (main and child tables); needs ``--from`` and ``--to`` on partition boundaries.
    * ``columns``: set only ``columns`` on existing rows matched by ``_row_id``; absent rows are reported.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    partner: str
    patterns: tuple[str, ...] = Field(min_length=1)
    format: Literal["auto", "jsonl", "avro"] = "auto"
    mode: Mode = "fill"
    columns: tuple[str, ...] = ()
    start_us: Optional[int] = None
    end_us: Optional[int] = None
    backfill_id: Optional[str] = None
    wave_chunks: int = Field(8, ge=1, le=100_000, description="Chunks per Beam run (the unit of resume).")

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p.strip() for p in v):
            raise ValueError("--source: empty pattern")
        return tuple(v)

    @field_validator("backfill_id")
    @classmethod
    def _id(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _ID.match(v):
            raise ValueError(f"--id: {v!r} must match [a-z][a-z0-9_]{{0,62}} (it names staging tables)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "BackfillSpec":
        if self.start_us is not None and self.end_us is not None and self.end_us <= self.start_us:
            raise ValueError("--to: must be after --from")
        if self.mode == "columns" and not self.columns:
            raise ValueError("--columns: mode 'columns' needs the columns to set, e.g. --columns loyalty_tier")
        if self.mode != "columns" and self.columns:
            raise ValueError(f"--columns: only applies to --mode columns, not {self.mode}")
        if self.mode == "replace" and (self.start_us is None or self.end_us is None):
            raise ValueError("--from/--to: mode 'replace' needs both (the partitions it replaces)")
        bad = [c for c in self.columns if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", c) or c.startswith("_")]
        if bad:
            raise ValueError(f"--columns: {bad} are not settable flattened column names")
        return self

    def check_partitions(self, table: str, granularity: str) -> None:
        """``replace`` replaces whole partitions: ``--from``/``--to`` must start partitions of ``table``."""
        if self.mode != "replace":
            return
        for flag, us in (("--from", self.start_us), ("--to", self.end_us)):
            if us is not None and not is_aligned(us, granularity):
                raise ValueError(f"{flag}: {format_us(us)} is not the start of a {granularity} partition of {table} "
                                 "(replace works on whole partitions)")

    def in_range(self, event_time_us: int) -> bool:
        return ((self.start_us is None or event_time_us >= self.start_us)
                and (self.end_us is None or event_time_us < self.end_us))

    @property
    def has_range(self) -> bool:
        return self.start_us is not None or self.end_us is not None

    def describe_range(self) -> str:
        if not self.has_range:
            return "all event times"
        return f"[{format_us(self.start_us)}, {format_us(self.end_us)})"
