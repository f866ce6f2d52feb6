"""Realistic synthetic partner events (deterministic per seed), for the demo, the publisher and tests.

Events are deeply nested, carry arrays and PII, and ``hostile_lines`` adds the
bad inputs a real feed delivers: malformed JSON, non-objects, bad UTF-8,
missing user ids, unparseable times, oversized and over-nested payloads, duplicates.
"""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Iterator

import orjson

__all__ = ["acme_event", "orbit_event", "nimbus_record", "hostile_lines", "NIMBUS_AVRO_SCHEMA", "BASE_TIME"]

BASE_TIME = datetime(2026, 11, 1, tzinfo=timezone.utc)
_MERCHANTS = ["m-coffee", "m-grocer", "m-airline", "m-books", "m-fuel", "m-cinema", "m-pharmacy", "m-hotel"]
_CHANNELS = ["web", "ios", "android", "branch", "atm"]
_CATEGORIES = ["credit_card", "mortgage", "savings", "auto_loan", "insurance"]
_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken"]


def _when(rng: random.Random, i: int, days: int = 20) -> datetime:
    return BASE_TIME + timedelta(seconds=int(i * (days * 86400) / 10_000) % (days * 86400), milliseconds=rng.randint(0, 999))


def acme_event(i: int, rng: random.Random, users: int = 500, extra: bool = False) -> dict:
    uid = f"cust-{rng.randrange(users):05d}"
    n = int(uid[5:])
    ev = {
        "event": {"id": f"acme-{i:08d}", "type": rng.choice(["card_payment", "transfer", "login"]),
                  "occurred_at": _when(rng, i).isoformat().replace("+00:00", "Z"),
                  "channel": rng.choice(_CHANNELS)},
        "customer": {
            "id": uid, "name": f"{_FIRST[n % 8]} Example{n}", "email": f"user{n}@example.com",
            "ssn": f"{100 + n % 800:03d}-{n % 90 + 10:02d}-{n % 9000 + 1000:04d}",
            "home": {"phone": f"+1-555-{n % 10000:04d}", "city": "Springfield"},
            "segments": ["retail", "premium"] if n % 5 == 0 else ["retail"],
            "kyc": {"verified": n % 7 != 0, "level": n % 3, "checked_at": "2026-01-15"},
        },
        "accounts": [{"number": f"GB{n:04d}{k:02d}00112233", "type": t, "balance": round(rng.uniform(-500, 25000), 2)}
                     for k, t in enumerate(["checking", "savings"][: 1 + n % 2])],
        "transaction": {"amount": round(rng.uniform(1, 900), 2), "currency": "USD",
                        "merchant": {"id": rng.choice(_MERCHANTS), "geo": {"lat": 51.5, "lon": -0.12,
                                                                            "meta": {"source": "gps", "acc_m": 12}}}},
    }
    if extra:  # a partner adds an attribute in a later chunk: a new column, no code change
        ev["transaction"]["loyalty_points"] = rng.randint(0, 500)
    return ev


def orbit_event(i: int, rng: random.Random, users: int = 300) -> dict:
    n = rng.randrange(users)
    cat = rng.choice(_CATEGORIES)
    return {
        "offer_event_id": f"orb-{i:08d}",
        "ts_ms": int(_when(rng, i).timestamp() * 1000),
        "shopper": {"uid": f"shop-{n:05d}", "email": f"user{n}@example.com", "prefs": {"lang": "en", "marketing": n % 2 == 0}},
        "product": {"id": f"p-{rng.randrange(60):03d}", "category": cat,
                    "terms": {"apr": round(rng.uniform(2.5, 29.9), 2), "months": rng.choice([12, 24, 36, 60]),
                              "fees": [{"kind": "origination", "amount": 99}, {"kind": "late", "amount": 35}][: 1 + n % 2]}},
        "offers": [{"rank": r, "partner_ref": f"ref-{i}-{r}", "tags": ["promo", cat]} for r in range(1 + i % 3)],
    }


NIMBUS_AVRO_SCHEMA = {
    "type": "record", "name": "Activity", "namespace": "nimbus",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "time", "type": "long"},  # epoch seconds
        {"name": "user", "type": {"type": "record", "name": "User", "fields": [
            {"name": "id", "type": ["null", "string"]}, {"name": "phone", "type": "string"}]}},
        {"name": "device", "type": {"type": "record", "name": "Device", "fields": [
            {"name": "os", "type": "string"}, {"name": "ad_id", "type": "string"}]}},
        {"name": "session", "type": {"type": "record", "name": "Session", "fields": [
            {"name": "screens", "type": "int"}, {"name": "last_screen", "type": "string"},
            {"name": "events", "type": {"type": "array", "items": {"type": "record", "name": "Ev", "fields": [
                {"name": "name", "type": "string"}, {"name": "ms", "type": "int"}]}}}]}},
    ],
}


def nimbus_record(i: int, rng: random.Random, users: int = 400) -> dict:
    n = rng.randrange(users)
    return {
        "id": f"nim-{i:08d}", "time": int(_when(rng, i).timestamp()),
        "user": {"id": None if i % 997 == 13 else f"np-{n:05d}", "phone": f"+44-7700-{n:06d}"},
        "device": {"os": rng.choice(["ios", "android"]), "ad_id": f"ad-{n:08x}"},
        "session": {"screens": rng.randint(1, 40), "last_screen": rng.choice(["home", "pay", "cards", "help"]),
                    "events": [{"name": "tap", "ms": rng.randint(10, 900)} for _ in range(1 + n % 3)]},
    }


def hostile_lines(partner_good: dict) -> Iterator[bytes]:
    """One of each kind of bad input (each becomes a dead letter with its own reason), plus a duplicate."""
    yield b'{"event": {"id": "broken-1", '  # malformed JSON
    yield b'[1, 2, 3]'  # not an object
    yield b'{"event": {"id": "bad-utf8"}, "customer": {"id": "\xff\xfe"}}'  # bad UTF-8
    missing_user = orjson.loads(orjson.dumps(partner_good))
    missing_user["event"]["id"] = "acme-missing-user"
    missing_user["customer"].pop("id")
    yield orjson.dumps(missing_user)
    bad_time = orjson.loads(orjson.dumps(partner_good))
    bad_time["event"]["id"] = "acme-bad-time"
    bad_time["event"]["occurred_at"] = "last tuesday"
    yield orjson.dumps(bad_time)
    deep: dict = {"leaf": 1}
    for _ in range(40):
        deep = {"n": deep}
    nested = orjson.loads(orjson.dumps(partner_good))
    nested["event"]["id"] = "acme-too-deep"
    nested["deep"] = deep
    yield orjson.dumps(nested)
    big = orjson.loads(orjson.dumps(partner_good))
    big["event"]["id"] = "acme-too-large"
    big["blob"] = "x" * 300_000
    yield orjson.dumps(big)
    yield b"  "  # a blank line: dead letter empty_line (every line is accounted for)
    yield orjson.dumps(partner_good)  # an exact duplicate: deduplicated, not a second row
