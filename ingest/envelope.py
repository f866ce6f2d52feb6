"""Pure envelope parsing: raw bytes -> validated, masked :class:`Event`, or a :class:`DeadLetter`.

No Beam import: ``ingest.parse.ParseEnvelope`` is the thin DoFn around it.
Order matters for privacy: the payload is masked right after it parses, so
the envelope fields, every later step, the dead letters and the logs only
ever see masked values. A payload that cannot be parsed is stored through
``Masker.protect_unparsed`` (encrypted when the partner has annotations).
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Optional, Union

import orjson

from flatten import jsonio
from flatten.mask import Masker
from flatten.records import DeadLetter, Event, RawMessage, Reason

__all__ = ["EnvelopeParser", "parse_event_time_us", "lookup_path", "nesting_depth"]

# Event times outside [1970, 2200) are treated as unparseable: they are almost
# always unit mistakes (seconds read as microseconds) and would create absurd partitions.
_MIN_US = 0
_MAX_US = int(datetime(2200, 1, 1, tzinfo=timezone.utc).timestamp() * 1_000_000)
_MISSING = object()


def lookup_path(doc: Any, path: str) -> Any:
    """Dotted path lookup ('user.id', 'items.0.sku'); returns a sentinel-free None-safe value or _MISSING."""
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def nesting_depth(doc: Any, limit: int) -> int:
    """Depth of containers (an object = 1); stops counting once ``limit`` is exceeded. Iterative: no recursion limit."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node if isinstance(v, (dict, list)))
    return deepest


def parse_event_time_us(value: Any, fmt: str = "auto", quote: bool = True) -> int:
    """ISO-8601 / RFC 3339 string or epoch number -> microseconds since epoch (UTC). Raises ValueError.

    ``quote=False`` (partners with annotations): the message names the problem but never quotes the value."""
    def q(v: Any) -> str:
        return f" {v[:64]!r}" if isinstance(v, str) and quote else f" {v!r}" if quote else ""

    if isinstance(value, bool) or value is None:
        raise ValueError(f"event time is {type(value).__name__}, not a timestamp")
    if isinstance(value, str) and fmt in ("auto", "iso8601"):
        s = value.strip()
        if fmt == "auto" and s.lstrip("-").replace(".", "", 1).isdigit():
            return parse_event_time_us(float(s) if "." in s else int(s), "auto", quote)
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise ValueError(f"event time{q(value)} is not ISO-8601") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        us = int(dt.timestamp()) * 1_000_000 + dt.microsecond
    elif isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("event time is not finite")
        if fmt == "auto":
            mag = abs(value)
            # Pick the unit by magnitude: seconds until ~2286, then ms, then us.
            fmt = "epoch_s" if mag < 1e10 else "epoch_ms" if mag < 1e13 else "epoch_us"
        scale = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}.get(fmt)
        if scale is None:
            raise ValueError(f"event time{q(value)} is a number but the format is {fmt}")
        scaled = value * scale
        if isinstance(scaled, float) and not math.isfinite(scaled):  # 1e305 ms: overflows, not an instant
            raise ValueError(f"event time{q(value)} is out of range")
        us = int(round(scaled))
    elif isinstance(value, str):
        s = value.strip()
        try:
            num = float(s) if "." in s else int(s)
        except ValueError:
            raise ValueError(f"event time{q(value)} is not a {fmt} number") from None
        return parse_event_time_us(num, fmt, quote)
    else:
        raise ValueError(f"event time is {type(value).__name__}, not a timestamp")
    if not _MIN_US <= us < _MAX_US:
        raise ValueError(f"event time{q(value)} is outside 1970..2200")
    return us


class EnvelopeParser:
    """Compiled per partner: decode, validate, mask and extract the envelope.

    ``parse(msg, now_us)`` returns an :class:`Event` or a :class:`DeadLetter`;
    it never raises for any payload bytes.
    """

    def __init__(self, envelope: Any, masker: Masker, step: str = "ParseEnvelope", native: Any = None):
        """``native``: a :class:`flatten.fast.FastFlattener` built with the same annotations and key as ``masker``;
        when its accelerator is built, well-formed events take the compiled path (identical Events; anything it
        does not handle, and every dead letter, goes through the Python code below)."""
        self.env = envelope
        self.masker = masker
        self.step = step
        self._id_attr = self._attr(envelope.event_id)
        self._user_attr = self._attr(envelope.user_id)
        self._time_attr = self._attr(envelope.event_time)
        self._native = None
        self.python_events = 0  # payloads the Python code below parsed (the compiled path declined or is off)
        if native is not None and not (self._id_attr or self._user_attr or self._time_attr) \
                and envelope.event_time_format in ("auto", "iso8601"):
            self._native = native.native_envelope_fn()

    @staticmethod
    def _attr(locator: str) -> Optional[str]:
        return locator[len("attribute:"):] if locator.startswith("attribute:") else None

    def _dead(self, msg: RawMessage, reason: str, message: str, now_us: int, *,
              doc: Any = _MISSING, error_class: str = "EnvelopeError",
              event_time_us: Optional[int] = None, keep_payload: bool = True) -> DeadLetter:
        if doc is not _MISSING:
            stored = jsonio.dumps(doc)  # doc is already masked
        elif keep_payload:
            stored = self.masker.protect_unparsed(msg.payload)
        else:
            stored = b""
        return DeadLetter(
            partner=msg.partner, source=msg.source, coords=msg.coords, payload=stored,
            payload_ref=self.masker.payload_ref(msg.payload), error_class=error_class, reason=reason,
            message=message, step=self.step, event_time_us=event_time_us, processing_time_us=now_us,
        )

    def _locate(self, doc: dict, attrs: Optional[dict], attr: Optional[str], path: str) -> Any:
        if attr is not None:
            return _MISSING if not attrs or attr not in attrs else attrs[attr]
        return lookup_path(doc, path)

    def parse(self, msg: RawMessage, now_us: int) -> Union[Event, DeadLetter]:
        env = self.env
        payload = msg.payload
        if len(payload) > env.max_payload_bytes:
            return self._dead(msg, Reason.TOO_LARGE,
                              f"payload is {len(payload)} bytes, limit max_payload_bytes={env.max_payload_bytes}",
                              now_us, keep_payload=False)
        if self._native is not None:
            fast = self._native(payload, env.max_nesting, env.event_id, env.user_id, env.event_time)
            if fast is not None:
                event_id, user_id, event_time_us, doc = fast
                return Event(partner=msg.partner, event_id=event_id, user_id=user_id, event_time_us=event_time_us,
                             coords=msg.coords, source=msg.source, doc=doc)
        self.python_events += 1
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._dead(msg, Reason.BAD_UTF8, f"payload is not valid UTF-8 at byte {exc.start}: {exc.reason}",
                              now_us, error_class="UnicodeDecodeError")
        try:
            doc = jsonio.loads(payload)  # integers beyond 64 bits stay exact
        except orjson.JSONDecodeError as exc:
            text = str(exc)
            if "recursion" in text.lower() or "depth limit" in text.lower():
                return self._dead(msg, Reason.TOO_DEEP, f"payload nests deeper than the JSON parser allows ({text})",
                                  now_us, error_class="JSONDecodeError")
            return self._dead(msg, Reason.MALFORMED_JSON, f"malformed JSON: {text}", now_us, error_class="JSONDecodeError")
        if not isinstance(doc, dict):
            return self._dead(msg, Reason.NOT_AN_OBJECT, f"payload is a JSON {type(doc).__name__}, expected an object",
                              now_us)
        depth = nesting_depth(doc, env.max_nesting)
        if depth > env.max_nesting:
            return self._dead(msg, Reason.TOO_DEEP, f"payload nests deeper than max_nesting={env.max_nesting}",
                              now_us, keep_payload=True)
        try:
            doc = self.masker.mask_doc(doc)
        except Exception as exc:  # noqa: BLE001 - masking bug must not leak the raw payload; typed dead letter instead
            return self._dead(msg, Reason.FLATTEN_ERROR, f"masking failed: {type(exc).__name__}", now_us,
                              error_class=type(exc).__name__)
        attrs: Optional[dict] = None
        if self._id_attr or self._user_attr or self._time_attr:
            try:
                attrs = orjson.loads(msg.attributes) if msg.attributes else {}
            except orjson.JSONDecodeError:
                attrs = {}
        raw_time = self._locate(doc, attrs, self._time_attr, env.event_time)
        if raw_time is _MISSING or raw_time is None:
            return self._dead(msg, Reason.BAD_EVENT_TIME, f"event time missing at {env.event_time!r}", now_us, doc=doc)
        try:
            event_time_us = parse_event_time_us(raw_time, env.event_time_format, quote=not self.masker.has_rules)
        except ValueError as exc:
            # partners with annotations: the field and the problem, never the value (``quote=False``)
            problem = str(exc).removeprefix("event time ").removeprefix("event time")
            return self._dead(msg, Reason.BAD_EVENT_TIME, f"event time at {env.event_time!r} {problem}".replace("  ", " "),
                              now_us, doc=doc, error_class="ValueError")
        user = self._locate(doc, attrs, self._user_attr, env.user_id)
        if user is _MISSING or user is None or user == "" or isinstance(user, (dict, list, bool)):
            what = "missing" if user is _MISSING or user is None or user == "" else f"a {type(user).__name__}"
            return self._dead(msg, Reason.MISSING_USER_ID, f"user id at {env.user_id!r} is {what}", now_us,
                              doc=doc, event_time_us=event_time_us)
        event_id = self._locate(doc, attrs, self._id_attr, env.event_id)
        if event_id is _MISSING or event_id is None or event_id == "" or isinstance(event_id, (dict, list, bool)):
            return self._dead(msg, Reason.MISSING_EVENT_ID, f"event id at {env.event_id!r} is missing or not a scalar",
                              now_us, doc=doc, event_time_us=event_time_us)
        return Event(partner=msg.partner, event_id=str(event_id), user_id=str(user), event_time_us=event_time_us,
                     coords=msg.coords, source=msg.source, doc=jsonio.dumps(doc))
