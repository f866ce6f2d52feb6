"""Scalar type inference and value conversion to BigQuery-ready JSON values.

Pure Python. Conventions (see docs/flatten.md):

* ``bool`` -> BOOL; ``int`` in int64 range -> INT64; other ``int`` with fewer
  than 30 digits -> NUMERIC (decimal string); larger ints -> STRING (decimal
  text; BigQuery NUMERIC holds 29 integer digits); ``float`` -> FLOAT64.
* ``str`` -> STRING unless timestamp detection applies:
  ``YYYY-MM-DD`` -> DATE (value unchanged); an ISO-8601 date-time (``T``, ``t``
  or space separator, any offset or none) -> TIMESTAMP rendered as UTC
  ``YYYY-MM-DDTHH:MM:SS.ffffffZ``; naive date-times are taken as UTC.
* In columns configured as timestamp columns numbers are epoch times too, unit
  chosen by magnitude: < 1e11 seconds, < 1e14 milliseconds, < 1e17
  microseconds, else nanoseconds.
* Containers kept whole are JSON text (orjson, key order as received).
"""
from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from typing import Any, Optional

import orjson

__all__ = [
    "INT64_MIN",
    "INT64_MAX",
    "TYPES",
    "parse_timestamp",
    "epoch_to_timestamp",
    "us_to_timestamp",
    "to_json_text",
    "int_value",
    "JsonTextError",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_NUMERIC_MAX = 10**29
TYPES = ("BOOL", "INT64", "FLOAT64", "NUMERIC", "STRING", "TIMESTAMP", "DATE", "JSON")

_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1)
_fromiso = datetime.fromisoformat
_date_fromiso = date.fromisoformat


class JsonTextError(ValueError):
    """A container could not be rendered as JSON text (too deep / unencodable)."""


def parse_timestamp(s: str) -> Optional[tuple[str, str]]:
    """``(value, "TIMESTAMP"|"DATE")`` if ``s`` is an ISO-8601 date/date-time, else None."""
    n = len(s)
    if n < 10 or n > 40 or s[4] != "-" or s[7] != "-" or not s[:4].isdigit():
        return None
    if n == 10:
        try:
            _date_fromiso(s)
        except ValueError:
            return None
        return s, "DATE"
    if s[10] not in "Tt ":
        return None
    if s[-1] == "Z" and n >= 20 and s[19] in ".Z" and s[13] == ":":
        # Common case, already UTC: validate, then reformat by slicing (no datetime math).
        try:
            _fromiso(s)
        except ValueError:
            return None
        frac = s[20:-1]
        if len(frac) <= 6 and (not frac or frac.isdigit()):
            return f"{s[:10]}T{s[11:19]}.{frac:0<6}Z", "TIMESTAMP"
    try:
        dt = _fromiso(s)
        off = dt.utcoffset()
        if off:
            dt = dt.astimezone(_UTC)
    except (ValueError, OverflowError):
        return None
    if off is not None:
        dt = dt.replace(tzinfo=None)
    return dt.isoformat(timespec="microseconds") + "Z", "TIMESTAMP"


def us_to_timestamp(us: int) -> str:
    """Microseconds since the epoch -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (OverflowError if out of range)."""
    return (_EPOCH + timedelta(microseconds=us)).isoformat(timespec="microseconds") + "Z"


def epoch_to_timestamp(v: float) -> Optional[str]:
    """An epoch number (unit by magnitude) as a TIMESTAMP string, or None if out of range."""
    a = abs(v)
    if a < 1e11:
        us = v * 1_000_000
    elif a < 1e14:
        us = v * 1_000
    elif a < 1e17:
        us = v
    else:
        us = v / 1_000
    try:
        return us_to_timestamp(int(us))
    except (OverflowError, ValueError):
        return None


def int_value(v: int) -> tuple[Any, str]:
    """An int's JSON-safe value and BigQuery type."""
    if INT64_MIN <= v <= INT64_MAX:
        return v, "INT64"
    if -_NUMERIC_MAX < v < _NUMERIC_MAX:
        return str(v), "NUMERIC"
    return str(v), "STRING"


def to_json_text(v: Any, sort_keys: bool = False) -> str:
    """JSON text of a container (orjson; stdlib fallback for ints beyond 64 bits)."""
    try:
        return orjson.dumps(v, option=orjson.OPT_SORT_KEYS if sort_keys else 0).decode()
    except orjson.JSONEncodeError as exc:
        first = exc
    try:
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:
        raise JsonTextError(f"cannot encode as JSON: {type(first).__name__}/{type(exc).__name__}") from None
