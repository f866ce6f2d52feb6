"""1,000 users streamed through the real local streaming runner (Prism) and the whole pipeline:
Kafka -> ParseEnvelope -> dedup -> flatten -> ComputeAggregates (state + processing-time timers) -> DuckDB.

Every event becomes exactly one row, and every user's *latest* emitted aggregate equals the plain-Python
reference exactly (count, sum and distinct count). This used to be softened to "a consistent partial":
Prism 2.77 lost state updates (and timer firings) whenever it split a bundle of the stateful stage
(docs/streaming.md, "Prism splits and per-key state"); headwater runs Prism with splits disabled, and this
test holds it to exact values for every user.
"""
from __future__ import annotations

import random
import time
from collections import defaultdict

import orjson
import pytest
import yaml

from deploy.publish import send_payloads
from ingest.contract import parse_contract
from ingest.pipeline import LIVE_BATCHES_LINE
from tests.ingest.conftest import live_services, unique_name, wait_for  # noqa: F401 (fixture)
from tests.ingest.test_streaming_e2e import ROOT, _launch, _query, _stop

pytestmark = pytest.mark.integration

USERS = 1000


def _events(seed=17):
    rnd = random.Random(seed)
    out = []
    # Event times within the last hour: inside allowed_lateness (2h) and far from the TTL (30d), so the
    # stream's semantics equal a plain count. (A fixed base date drifted into the past as the clock moved
    # on: events 70 days old expired by TTL one by one as the watermark passed them, and the latest row
    # of a key was a later generation's partial count: right for the stream, wrong for this reference.)
    base = int(time.time() * 1000) - 3_600_000
    for u in range(USERS):
        for _ in range(rnd.randint(1, 4)):
            i = len(out)
            out.append({"offer_event_id": f"ev-{i:06d}", "ts_ms": base + rnd.randrange(0, 3_600_000),
                        "shopper": {"uid": f"user-{u:04d}", "email": f"u{u}@example.com"},
                        "product": {"category": rnd.choice(["card", "loan", "savings"]),
                                    "terms": {"apr": rnd.randrange(100, 3000) / 100}}})
    rnd.shuffle(out)
    return out


def _reference(events):
    ref = defaultdict(lambda: {"n": 0, "apr_sum": 0.0, "cats": set()})
    for e in events:
        r = ref[e["shopper"]["uid"]]
        r["n"] += 1
        r["apr_sum"] += e["product"]["terms"]["apr"]
        r["cats"].add(e["product"]["category"])
    return {u: (r["n"], round(r["apr_sum"], 6), len(r["cats"])) for u, r in ref.items()}


@pytest.mark.parametrize("steps", ["batched", "per-key"])
def test_thousand_users_on_prism_equal_reference(live_services, tmp_path, steps, monkeypatch):  # noqa: F811
    """``batched``: the local job's default (ingest.live_batches); ``per-key``: the steps Dataflow runs
    (HEADWATER_LIVE_BATCHES=0), on the same runner."""
    monkeypatch.setenv("HEADWATER_LIVE_BATCHES", "1" if steps == "batched" else "0")
    raw = yaml.safe_load((ROOT / "examples" / "streaming.yaml").read_text())
    raw["warehouse"]["path"] = str(tmp_path / "wh.duckdb")
    tag = unique_name("agg")
    orbit = next(p for p in raw["partners"] if p["name"] == "orbit_live")
    orbit["sources"][0].update(topics=[tag], group_id=f"g-{tag}", bootstrap_servers=live_services.kafka_bootstrap,
                               start="earliest")
    orbit["aggregates"] = [{"name": "per_user", "windows": ["lifetime"], "emit_every": "1s",
                            "allowed_lateness": "2h", "ttl": "30d",
                            "metrics": [{"name": "n", "fn": "count"},
                                        {"name": "apr_sum", "fn": "sum", "column": "product__terms__apr"},
                                        {"name": "cats", "fn": "distinct", "column": "product__category"}]}]
    raw["partners"] = [orbit]
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(raw))
    contract = parse_contract(raw, str(path))
    events = _events()
    assert send_payloads(contract, "orbit_live", [(orjson.dumps(e), {}) for e in events]) == len(events)
    expected = _reference(events)
    assert len(expected) == USERS

    def latest():
        rows = _query(contract, """SELECT key, metrics FROM aggregates WHERE "window" = 'lifetime'
                                   QUALIFY row_number() OVER (PARTITION BY key ORDER BY version DESC) = 1""")
        out = {}
        for key, metrics in rows or []:
            m = orjson.loads(metrics)
            out[key] = (m["n"], round(m["apr_sum"], 6), m["cats"])
        return out

    job = _launch(path, tmp_path / "job.log")
    try:
        done = wait_for(lambda: latest() == expected, timeout=300)
        time.sleep(3)  # anything duplicated would land now
    finally:
        rc = _stop(job)
    log = (tmp_path / "job.log").read_text()
    rows = _query(contract, "SELECT count(*), count(DISTINCT _event_id) FROM orbit_live_offers")
    got = latest()
    wrong = {u: (got.get(u), expected[u]) for u in expected if got.get(u) != expected[u]}
    assert done and not wrong, (f"{len(wrong)}/{USERS} users' latest aggregates differ from the reference "
                                f"(got, expected), e.g. {dict(list(wrong.items())[:5])}; rows {rows}; "
                                f"log:\n{log[-3000:]}")
    assert rc == 0, log[-3000:]
    assert (LIVE_BATCHES_LINE in log) == (steps == "batched")
    assert rows[0] == (len(events), len(events))
    assert set(got) == set(expected)
