"""``headwater verify``: recompute every aggregate from the warehouse rows and compare with the latest
aggregate rows. Exit 0 when every (partner, aggregate, key, window) is exact, 1 on any drift.

Works on both warehouses (DuckDB file, BigQuery incl. an emulator endpoint) through
``sinks.warehouse_reader``; the arithmetic is ``state.recompute`` (the stream's own pure
functions), so the comparison is exact equality, HyperLogLog estimates included. Each sliding
window is compared as of the ``watermark_us`` its aggregate row reflects.

Per aggregate the report counts keys that

* **match**: every window's latest row equals the recomputation;
* **differ**: some window differs, or a window row is missing; the largest differences are
  listed (key, window, metric, expected vs found), numeric ones by absolute difference first;
* **missing**: rows with events, but no aggregate row at all;
* **extra**: aggregate rows for a key without any (non-late) event row.

``--since T`` checks only keys with an event at or after ``T`` (their aggregates are still
recomputed from all of their rows); extra rows are only looked for without ``--since``.
``--repair`` writes the recomputed rows of differing/missing keys (backfill.aggregates), then verifies again.
Design and limits: docs/state.md, "Verify".
"""
from __future__ import annotations

import heapq
import math
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Optional, TextIO

import orjson

from flatten.records import AggregateInput
from sinks.warehouse_reader import (LatestAggregate, WarehouseReadError, aggregate_inputs_from_warehouse,
                                    latest_aggregate_rows, specs_of)
from state.recompute import recompute
from state.spec import parse_duration_s

__all__ = ["verify", "render_text", "render_json", "parse_since", "Difference", "AggregateReport",
           "VerifyReport", "VerifyUsageError"]

_DURATION = re.compile(r"^\s*\d+\s*(ms|s|m|h|d)\s*$")


class VerifyUsageError(ValueError):
    """A bad argument (exit 2)."""


@dataclass(frozen=True)
class Difference:
    key: str
    window: str
    metric: str  # "<row>" when the whole window row is missing
    expected: Any
    found: Any

    @property
    def magnitude(self) -> float:
        e, f = self.expected, self.found
        if _num(e) and _num(f):
            return abs(float(e) - float(f))
        return math.inf

    def as_dict(self) -> dict:
        return {"key": self.key, "window": self.window, "metric": self.metric, "expected": self.expected,
                "found": self.found}


@dataclass
class AggregateReport:
    partner: str
    aggregate: str
    match: int = 0
    differ: int = 0
    missing: int = 0
    extra: int = 0
    windows_checked: int = 0
    largest: list = field(default_factory=list)  # [Difference], largest first
    missing_keys: list = field(default_factory=list)  # a few examples
    extra_keys: list = field(default_factory=list)

    @property
    def keys(self) -> int:
        return self.match + self.differ + self.missing + self.extra

    @property
    def ok(self) -> bool:
        return not (self.differ or self.missing or self.extra)

    def as_dict(self) -> dict:
        return {"partner": self.partner, "aggregate": self.aggregate, "ok": self.ok, "keys": self.keys,
                "match": self.match, "differ": self.differ, "missing": self.missing, "extra": self.extra,
                "windows_checked": self.windows_checked,
                "largest_differences": [d.as_dict() for d in self.largest],
                "missing_keys": self.missing_keys, "extra_keys": self.extra_keys}


@dataclass
class VerifyReport:
    warehouse: str
    since_us: Optional[int]
    events_read: int
    aggregates: list  # [AggregateReport]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.aggregates)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "warehouse": self.warehouse, "since_us": self.since_us,
                "events_read": self.events_read, "seconds": round(self.seconds, 3),
                "aggregates": [a.as_dict() for a in self.aggregates]}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_since(text: Optional[str], now_s: Optional[float] = None) -> Optional[int]:
    """``--since``: an RFC 3339 / ISO-8601 time (``2026-03-01``, ``2026-03-01T10:00:00Z``) or a duration
    back from now (``6h``, ``2d``) -> microseconds since the epoch."""
    if text is None:
        return None
    if _DURATION.match(text):
        now = time.time() if now_s is None else now_s
        return int((now - parse_duration_s(text)) * 1_000_000)
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise VerifyUsageError(f"--since: {text!r} is neither an ISO-8601 time (2026-03-01T10:00:00Z) "
                               f"nor a duration (6h, 2d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def _where(contract) -> str:
    wh = contract.warehouse
    if wh.kind == "duckdb":
        return f"duckdb {wh.path}"
    return f"bigquery {wh.project}.{wh.dataset}" + (f" at {wh.endpoint}" if wh.endpoint else "")


class _Counted:
    def __init__(self, it: Iterable[AggregateInput]):
        self._it = it
        self.n = 0

    def __iter__(self) -> Iterator[AggregateInput]:
        for x in self._it:
            self.n += 1
            yield x


def verify(contract, partner: Optional[str] = None, since_us: Optional[int] = None, top: int = 5) -> VerifyReport:
    """Compare the latest aggregate rows with a recomputation from the rows. Raises WarehouseReadError."""
    t0 = time.monotonic()
    specs = specs_of(contract, partner)
    latest = {k: v for k, v in latest_aggregate_rows(contract, partner).items() if (k[0], k[1]) in specs}
    keys = None
    if since_us is not None:
        keys = {(i.partner, i.aggregate, i.key) for i in aggregate_inputs_from_warehouse(contract, partner, since_us)}
        latest = {k: v for k, v in latest.items() if k[:3] in keys}
    counted = _Counted(aggregate_inputs_from_warehouse(contract, partner))
    expected = recompute(specs, counted, {k: v.watermark_us for k, v in latest.items()}, keys)
    reports = {pa: AggregateReport(*pa) for pa in specs}
    _compare(specs, expected, latest, reports, top)
    return VerifyReport(_where(contract), since_us, counted.n, list(reports.values()), time.monotonic() - t0)


def _compare(specs, expected: dict, latest: dict[tuple, LatestAggregate], reports: dict, top: int) -> None:
    by_key: dict[tuple, list[str]] = {}
    for (p, a, k, w) in set(expected) | set(latest):
        by_key.setdefault((p, a, k), []).append(w)
    heaps: dict[tuple, list] = {pa: [] for pa in reports}
    seq = 0
    for (p, a, k), windows in sorted(by_key.items()):
        rep = reports[(p, a)]
        have_exp = any((p, a, k, w) in expected for w in windows)
        have_row = any((p, a, k, w) in latest for w in windows)
        if not have_row:
            rep.missing += 1
            if len(rep.missing_keys) < top:
                rep.missing_keys.append(k)
            continue
        if not have_exp:
            rep.extra += 1
            if len(rep.extra_keys) < top:
                rep.extra_keys.append(k)
            continue
        diffs: list[Difference] = []
        for w in sorted(windows):
            exp, row = expected.get((p, a, k, w)), latest.get((p, a, k, w))
            rep.windows_checked += 1
            if row is None:
                diffs.append(Difference(k, w, "<row>", "a row", None))
            elif exp is None:
                diffs.append(Difference(k, w, "<row>", None, "a row"))
            else:
                for name in sorted(set(exp) | set(row.metrics)):
                    e, f = exp.get(name), row.metrics.get(name)
                    if e != f or (type(e) is bool) != (type(f) is bool):
                        diffs.append(Difference(k, w, name, e, f))
        if diffs:
            rep.differ += 1
            for d in diffs:
                seq += 1
                item = (d.magnitude, -seq, d)
                h = heaps[(p, a)]
                if len(h) < top:
                    heapq.heappush(h, item)
                else:
                    heapq.heappushpop(h, item)
        else:
            rep.match += 1
    for pa, h in heaps.items():
        reports[pa].largest = [d for _, _, d in sorted(h, key=lambda x: (x[0], x[1]), reverse=True)]


# ---------------------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    return orjson.dumps(v).decode() if not isinstance(v, str) else v


def render_text(report: VerifyReport, out: TextIO) -> None:
    since = ""
    if report.since_us is not None:
        since = f", keys with events since {datetime.fromtimestamp(report.since_us / 1e6, timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
    print(f"verify {report.warehouse}: {report.events_read:,} aggregate inputs read from the rows{since} "
          f"({report.seconds:.1f} s)", file=out)
    for a in report.aggregates:
        verdict = "OK" if a.ok else "DRIFT"
        print(f"  {a.partner}/{a.aggregate}: {a.keys:,} keys: {a.match:,} match, {a.differ:,} differ, "
              f"{a.missing:,} missing, {a.extra:,} extra ({a.windows_checked:,} window rows compared) {verdict}",
              file=out)
        for d in a.largest:
            print(f"      key {d.key!r} window {d.window} metric {d.metric}: expected {_fmt(d.expected)}, "
                  f"found {_fmt(d.found)}", file=out)
        if a.missing_keys:
            print(f"      missing (events but no aggregate row): {', '.join(map(repr, a.missing_keys))}"
                  + (" ..." if a.missing > len(a.missing_keys) else ""), file=out)
        if a.extra_keys:
            print(f"      extra (aggregate rows without events): {', '.join(map(repr, a.extra_keys))}"
                  + (" ..." if a.extra > len(a.extra_keys) else ""), file=out)
    bad = [a for a in report.aggregates if not a.ok]
    if not report.aggregates:
        print("verify: the contract declares no aggregates: nothing to compare", file=out)
    elif bad:
        print(f"verify: DRIFT in {len(bad)} of {len(report.aggregates)} aggregates", file=out)
    else:
        print(f"verify: OK, {len(report.aggregates)} aggregates equal the recomputation from the rows", file=out)


def render_json(report: VerifyReport, out: TextIO) -> None:
    out.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def run_verify(contract, partner: Optional[str], since: Optional[str], as_json: bool, top: int = 5,
               out: Optional[TextIO] = None, repair: bool = False) -> int:
    """The command: 0 exact, 1 drift; usage and warehouse errors raise (the CLI maps them to exit 2).

    ``repair``: on drift, write the recomputed rows of the keys that differ or are missing
    (backfill.aggregates), then verify again; the exit code is the second verify's."""
    if partner is not None:
        contract.partner(partner)  # ContractError naming the partners there are
    out = out or sys.stdout
    since_us = parse_since(since)
    report = verify(contract, partner, since_us, top=top)
    if repair and not report.ok:
        from backfill.aggregates import run_aggregates_pass, touched_keys

        if not as_json:
            render_text(report, out)
        keys = touched_keys(contract, partner, since_us, None) if since_us is not None else None
        res = run_aggregates_pass(contract, partner, keys)
        print(f"verify --repair: {res.line()}; verifying again", file=sys.stderr if as_json else out)
        report = verify(contract, partner, since_us, top=top)
    (render_json if as_json else render_text)(report, out)
    return 0 if report.ok else 1


__all__ += ["run_verify", "WarehouseReadError"]
