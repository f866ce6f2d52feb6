"""JSON in and out of the pipeline with integers of any size kept exact. Pure Python, no Beam.

orjson (the pipeline's codec) reads integers beyond 64 bits as floats (``2**70`` would
land as a FLOAT64 with its low digits lost) and refuses to write them. Every place a
payload is parsed or a document re-encoded goes through :func:`loads` / :func:`dumps`:
orjson on the fast path, and the standard library only for a payload with a run of 20+
digits (the shortest integer literal that can exceed 64 bits), which is rare. The
flattener then types such integers NUMERIC (decimal string, under 10^29) or STRING
(decimal string, beyond NUMERIC's 29 integer digits): the same choice for DuckDB and
BigQuery (docs/flatten.md "Types").
"""
from __future__ import annotations

import json
import re
from typing import Any, Union

import orjson

__all__ = ["loads", "dumps", "may_have_big_int"]

# 20+ digits may exceed u64 (2**64-1 has 20); a negative needs only 19 to pass i64's -2**63 (-9223372036854775809:
# orjson read it as a float, silently rounding, until the native differential test found it, 2026-12-03)
_BIG = re.compile(rb"[0-9]{20}|-[0-9]{19}")
_BIG_STR = re.compile(r"[0-9]{20}|-[0-9]{19}")


def may_have_big_int(data: Union[bytes, str]) -> bool:
    """True when ``data`` has a run of 20+ digits, or a minus and 19 digits (an integer literal that may be
    beyond what orjson reads exactly: -2**63 .. 2**64-1)."""
    return (_BIG if isinstance(data, (bytes, bytearray, memoryview)) else _BIG_STR).search(data) is not None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(data: Union[bytes, str]) -> Any:
    """``orjson.loads`` (raising what it raises), but integers beyond 64 bits exact (``int``), not floats."""
    doc = orjson.loads(data)
    if may_have_big_int(data):
        try:
            # the payload is valid JSON for orjson; the stdlib parser differs only in keeping big integers exact
            doc = json.loads(data, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            pass  # (cannot happen for orjson-valid JSON within the nesting limits; keep orjson's reading)
    return doc


def dumps(doc: Any) -> bytes:
    """``orjson.dumps``, falling back to compact stdlib JSON for integers beyond 64 bits."""
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
