"""A backfill of the same events gives the same rows and final aggregates as the live stream did.

Stream: the whole HeadwaterPipeline in streaming mode, its source replaced by a
TestStream that delivers the events in shuffled order over advancing event and
processing time (with a redelivery). Backfill: the same events written to
gzipped JSONL chunks, run through ``backfill_contract`` + the batch runner.
Both write real DuckDB files; every table is compared row by row.
"""
import gzip
import random

import duckdb
import orjson
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream

import apache_beam as beam
from backfill.plan import BackfillPlan, backfill_contract
from flatten.records import RawMessage
from ingest.contract import parse_contract
from ingest.pipeline import build, run

T0 = 1_780_000_000  # event-time origin (s)


def contract(db, pattern="unused"):
    return parse_contract({
        "warehouse": {"kind": "duckdb", "path": str(db)},
        "partners": [{
            "name": "acme",
            "sources": [{"kind": "pubsub", "subscription": "projects/test-project/subscriptions/acme-live"}],
            "envelope": {"event_id": "id", "user_id": "user.id", "event_time": "ts"},
            "columns": [{"path": "user.email", "pii": "tokenize"}],
            "table": {"name": "acme_events"},
            "aggregates": [{"name": "activity", "windows": ["lifetime", "1d"], "emit_every": "30s",
                            "allowed_lateness": "1d", "ttl": "30d",
                            "metrics": [{"name": "n", "fn": "count"}, {"name": "spend", "fn": "sum", "column": "amount"},
                                        {"name": "skus", "fn": "distinct", "column": "item__sku"},
                                        {"name": "last_plan", "fn": "latest", "column": "plan"}]}],
        }],
    })


def events(n=120, users=9, seed=3):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        t = T0 + i * 600 + rnd.randrange(0, 300)
        ev = {"id": f"e{i:04d}", "ts": t * 1000, "user": {"id": f"u{rnd.randrange(users)}", "email": f"x{i % 7}@ex.com"},
              "amount": round(rnd.uniform(1, 50), 2), "plan": rnd.choice(["free", "pro"]),
              "item": {"sku": f"s{rnd.randrange(12)}"}, "lines": [{"q": k} for k in range(i % 3)]}
        out.append((t, orjson.dumps(ev)))
    return out


def dump(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM _headwater_tables ORDER BY 1").fetchall()]
        rows = {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}" ORDER BY _row_id').fetchall())) for t in tables}
        finals = con.execute("""SELECT key, "window", metrics FROM aggregates
                                QUALIFY row_number() OVER (PARTITION BY key, "window" ORDER BY version DESC) = 1
                                ORDER BY 1, 2""").fetchall()
        return rows, [(k, w, orjson.loads(m)) for k, w, m in finals]
    finally:
        con.close()


def _run_stream(db, ts) -> None:
    """The whole streaming pipeline into ``db`` with its Pub/Sub source replaced by the TestStream ``ts``."""
    ts.advance_watermark_to_infinity()
    opts = PipelineOptions(["--runner=BundleBasedDirectRunner"])
    opts.view_as(StandardOptions).streaming = True
    with TestPipeline(options=opts) as p:
        build(p, contract(db), source_overrides={"Read_acme_pubsub_0": ts}, require_overrides=True)


def test_backfill_equals_stream(tmp_path):
    evs = events()
    # --- the live stream: shuffled within small batches, advancing watermark and processing time, one redelivery
    stream_db = tmp_path / "stream.duckdb"
    ts = TestStream(coder=beam.coders.registry.get_coder(RawMessage))
    ts.advance_watermark_to(T0 - 1)
    order = list(enumerate(evs))
    batches = [order[i:i + 10] for i in range(0, len(order), 10)]
    rnd = random.Random(5)
    for b in batches:
        rnd.shuffle(b)
        msgs = [beam.window.TimestampedValue(
            RawMessage("acme", "pubsub", f"pubsub:sub#{i}", payload, b"{}", t * 1_000_000), t) for i, (t, payload) in b]
        ts.add_elements(msgs)
        ts.advance_processing_time(31)
        ts.advance_watermark_to(min(t for _, (t, _) in b))
    i0, (t_first, p_first) = order[0]
    ts.add_elements([beam.window.TimestampedValue(
        RawMessage("acme", "pubsub", "pubsub:sub#redelivered", p_first, b"{}", t_first * 1_000_000), t_first)])
    _run_stream(stream_db, ts)
    # --- the backfill: the same events in two gzipped chunks
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    for k in range(2):
        with gzip.open(chunks / f"part-{k}.jsonl.gz", "wb") as fh:
            fh.write(b"\n".join(pl for _, pl in evs[k::2]) + b"\n")
    bf_db = tmp_path / "backfill.duckdb"
    bf = backfill_contract(contract(bf_db), BackfillPlan(partner="acme", patterns=(str(chunks / "*.jsonl.gz"),)))
    run(bf, [])
    stream_rows, stream_aggs = dump(stream_db)
    bf_rows, bf_aggs = dump(bf_db)
    assert set(stream_rows) == {"acme_events", "acme_events__lines"}
    assert len(stream_rows["acme_events"]) == len(evs)
    assert stream_rows == bf_rows
    assert stream_aggs == bf_aggs
    assert len(stream_aggs) == 2 * 9


def test_sums_past_the_number_range_agree_between_stream_and_backfill(tmp_path):
    """Amounts that overflow a sum (two floats near 1e308 for one user; three 2**63-1 ints for another) neither
    crash the job nor differ between the live stream (state written and read through Beam state) and the
    backfill (the fold): both write the exact total as a string (state.metrics.wide)."""
    evs = events(n=60, users=5, seed=9)
    extreme = {"big0": [1e308, 1.5e308, -0.25], "big1": [2**63 - 1] * 3, "big2": [-1.7e308, -1.7e308, 2**64 - 1]}
    for user, amounts in extreme.items():
        for j, amount in enumerate(amounts):
            t = T0 + 40_000 + j * 900
            ev = {"id": f"x-{user}-{j}", "ts": t * 1000, "user": {"id": user, "email": "big@ex.com"}, "amount": amount,
                  "plan": "pro", "item": {"sku": "s1"}, "lines": []}
            evs.append((t, orjson.dumps(ev)))
    evs.sort()
    stream_db = tmp_path / "stream.duckdb"
    ts = TestStream(coder=beam.coders.registry.get_coder(RawMessage)).advance_watermark_to(T0 - 1)
    for i in range(0, len(evs), 7):
        b = list(enumerate(evs))[i:i + 7]
        random.Random(i).shuffle(b)
        ts.add_elements([beam.window.TimestampedValue(
            RawMessage("acme", "pubsub", f"pubsub:sub#{k}", payload, b"{}", t * 1_000_000), t) for k, (t, payload) in b])
        ts.advance_processing_time(31)
        ts.advance_watermark_to(min(t for _, (t, _) in b))
    _run_stream(stream_db, ts)
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    with gzip.open(chunks / "part-0.jsonl.gz", "wb") as fh:
        # in time order, like the stream: the first amount decides the base column's type (flatten.schema), so a
        # file that starts with the big int would put the floats in a variant column instead
        fh.write(b"\n".join(pl for _, pl in evs) + b"\n")
    bf_db = tmp_path / "backfill.duckdb"
    run(backfill_contract(contract(bf_db), BackfillPlan(partner="acme", patterns=(str(chunks / "*.jsonl.gz"),))), [])
    stream_rows, stream_aggs = dump(stream_db)
    bf_rows, bf_aggs = dump(bf_db)
    assert stream_rows == bf_rows and len(stream_rows["acme_events"]) == len(evs)
    assert stream_aggs == bf_aggs
    spend = {k: m["spend"] for k, w, m in stream_aggs if w == "lifetime"}
    others = [v for k, v in spend.items() if k not in extreme]
    assert others and all(isinstance(v, float) for v in others)
    assert {k: spend[k] for k in extreme} == {"big0": "2.5000000000000000E+308",
                                              "big1": str(3 * (2**63 - 1)), "big2": "-3.3999999999999999E+308"}
