"""Pure envelope parsing: each kind of bad input gets its own dead-letter reason; masking happens first."""
import orjson
import pytest

from flatten.mask import Masker
from flatten.options import ColumnAnnotation, PiiPolicy
from flatten.records import DeadLetter, Event, RawMessage, Reason
from ingest.contract import EnvelopeSpec
from ingest.envelope import EnvelopeParser, nesting_depth, parse_event_time_us

KEY = b"k" * 32
ENV = EnvelopeSpec(event_id="id", user_id="user.id", event_time="ts", max_payload_bytes=4096, max_nesting=10)


def msg(payload: bytes, attrs: dict | None = None) -> RawMessage:
    return RawMessage("p1", "file", "file:x:1", payload, orjson.dumps(attrs or {}), 0)


def parser(columns=()) -> EnvelopeParser:
    return EnvelopeParser(ENV, Masker(columns, KEY))


GOOD = {"id": "e1", "user": {"id": "u1", "ssn": "123-45-6789"}, "ts": "2026-01-02T03:04:05Z"}


def test_good_event():
    out = parser().parse(msg(orjson.dumps(GOOD)), 1)
    assert isinstance(out, Event)
    assert (out.event_id, out.user_id, out.event_time_us) == ("e1", "u1", 1767323045_000_000)


@pytest.mark.parametrize("payload,reason", [
    (b'{"id": "e1", ', Reason.MALFORMED_JSON),
    (b'[1,2]', Reason.NOT_AN_OBJECT),
    (b'"just a string"', Reason.NOT_AN_OBJECT),
    (b'{"id": "e1", "user": {"id": "\xff"}, "ts": 1}', Reason.BAD_UTF8),
    (orjson.dumps({"id": "e1", "ts": "2026-01-02T03:04:05Z"}), Reason.MISSING_USER_ID),
    (orjson.dumps({"id": "e1", "user": {"id": ""}, "ts": "2026-01-02T03:04:05Z"}), Reason.MISSING_USER_ID),
    (orjson.dumps({"id": "e1", "user": {"id": {"x": 1}}, "ts": "2026-01-02T03:04:05Z"}), Reason.MISSING_USER_ID),
    (orjson.dumps({"id": "e1", "user": {"id": "u"}, "ts": "yesterday"}), Reason.BAD_EVENT_TIME),
    (orjson.dumps({"id": "e1", "user": {"id": "u"}}), Reason.BAD_EVENT_TIME),
    (orjson.dumps({"user": {"id": "u"}, "ts": 1767323045}), Reason.MISSING_EVENT_ID),
    (b'{"a": "' + b"x" * 5000 + b'"}', Reason.TOO_LARGE),
    (b'{"a":' * 20 + b'1' + b'}' * 20, Reason.TOO_DEEP),
    (b'[' * 5000 + b']' * 5000, Reason.TOO_LARGE),
])
def test_bad_inputs_have_distinct_reasons(payload, reason):
    out = parser().parse(msg(payload), 1)
    assert isinstance(out, DeadLetter), out
    assert out.reason == reason
    assert out.message and out.step == "ParseEnvelope" and out.payload_ref.startswith("sha256:")


def test_parser_recursion_limit_is_a_dead_letter_not_a_crash():
    big = EnvelopeSpec(max_payload_bytes=10_000_000, max_nesting=512)
    p = EnvelopeParser(big, Masker((), KEY))
    out = p.parse(msg(b'[' * 200_000 + b']' * 200_000), 1)
    assert isinstance(out, DeadLetter) and out.reason == Reason.TOO_DEEP


def test_attributes_locators():
    env = EnvelopeSpec(event_id="attribute:eid", user_id="user.id", event_time="attribute:ts")
    p = EnvelopeParser(env, Masker((), KEY))
    out = p.parse(msg(orjson.dumps({"user": {"id": "u9"}}), {"eid": "x-1", "ts": "1767323045000"}), 1)
    assert isinstance(out, Event) and out.event_id == "x-1" and out.event_time_us == 1767323045_000_000


def test_masking_happens_before_anything_else_sees_the_doc():
    cols = (ColumnAnnotation(path="user.ssn", pii=PiiPolicy.HASH),)
    out = parser(cols).parse(msg(orjson.dumps(GOOD)), 1)
    assert isinstance(out, Event) and b"123-45-6789" not in out.doc
    # a failed but parseable event stores the masked doc
    bad = dict(GOOD, ts="never")
    dl = parser(cols).parse(msg(orjson.dumps(bad)), 1)
    assert isinstance(dl, DeadLetter) and b"123-45-6789" not in dl.payload
    # an unparseable payload of a partner with annotations is stored protected, never raw
    raw = b'{"user": {"ssn": "123-45-6789"}, '
    dl = parser(cols).parse(msg(raw), 1)
    assert dl.reason == Reason.MALFORMED_JSON and b"123-45-6789" not in dl.payload


@pytest.mark.parametrize("value,fmt,expected", [
    ("2026-01-02T03:04:05Z", "auto", 1767323045_000_000),
    ("2026-01-02T04:04:05+01:00", "auto", 1767323045_000_000),
    ("2026-01-02T03:04:05.5", "iso8601", 1767323045_500_000),
    (1767323045, "auto", 1767323045_000_000),
    (1767323045123, "auto", 1767323045_123_000),
    (1767323045123456, "auto", 1767323045_123_456),
    ("1767323045123", "epoch_ms", 1767323045_123_000),
])
def test_event_time_formats(value, fmt, expected):
    assert parse_event_time_us(value, fmt) == expected


@pytest.mark.parametrize("value", [True, None, "x", float("nan"), -5, 10**30, {"a": 1}, "3000-01-01T00:00:00Z"])
def test_event_time_rejects(value):
    with pytest.raises(ValueError):
        parse_event_time_us(value)


def test_nesting_depth_is_iterative():
    doc: dict = {}
    cur = doc
    for _ in range(5000):
        cur["a"] = {}
        cur = cur["a"]
    assert nesting_depth(doc, 100) > 100
