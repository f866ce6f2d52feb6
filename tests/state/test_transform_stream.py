"""TestStream semantics of ComputeAggregates: panes, cadence, lateness, TTL (DirectRunner, streaming)."""
from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to, equal_to_per_window
from apache_beam.transforms.window import GlobalWindow

from state.spec import AggregateSpec, MetricSpec
from state.transform import ComputeAggregates
from tests.state.streamkit import END, MIN, START, S, FixedClock, inp, plain, streaming_options

SPEC = AggregateSpec(
    name="activity",
    metrics=[MetricSpec(name="n", fn="count"), MetricSpec(name="amount", fn="sum", column="amount"),
             MetricSpec(name="plan", fn="latest", column="plan")],
    windows=("lifetime", "1h"), emit_every="60s", allowed_lateness="10m", ttl="2h")
SPECS = {("p", "activity"): SPEC}
_LOCAL = [None]  # the job token of the current test: state mirrored in-process (state.mirror) or not


@pytest.fixture(params=[None, "mirrored"], autouse=True)
def local_state(request):
    """Every stream runs twice: reading the runner's state per element, and with the in-process mirror the
    local streaming runner uses (the DirectRunner's state lives in this process too)."""
    import uuid

    _LOCAL[0] = None if request.param is None else uuid.uuid4().hex
    yield _LOCAL[0]
    _LOCAL[0] = None


def _run(stream, check_rows, check_dead):
    with beam.Pipeline(options=streaming_options()) as p:
        out = p | "Events" >> stream | "Aggregate" >> ComputeAggregates(SPECS, clock=FixedClock(),
                                                                         local_state=_LOCAL[0])
        rows = out.aggregates | "Plain" >> beam.Map(plain)
        assert_that(rows, check_rows, label="CheckRows")
        dead = out.dead_letter | "DeadPlain" >> beam.Map(lambda d: (d.reason, d.event_time_us, d.step))
        assert_that(dead, check_dead, label="CheckDead")


def _rows_for(rows, key, window):
    return sorted((r for r in rows if r[0] == key and r[1] == window), key=lambda r: r[4])


def test_early_ontime_late_panes_cadence_lateness_and_ttl():
    stream = (TestStream()
              .advance_processing_time(START).advance_watermark_to(0)
              .add_elements([inp("u1", 1 * MIN, 1, amount=5, plan="free")])
              .advance_processing_time(20)  # 20 s < emit_every: no row yet
              .add_elements([inp("u1", 2 * MIN + 30 * S, 2, amount=7)])
              .advance_processing_time(50)  # 70 s: the cadence timer (START + 60) fires -> early pane
              .advance_processing_time(120)  # nothing changed: no row
              .advance_watermark_to(4 * 60)  # closes at 2m and 3m -> on-time panes for 1h
              .add_elements([inp("u1", 1 * MIN + 30 * S, 3, amount=1, plan="pro")])  # late, within 10m
              .advance_processing_time(120)  # late pane
              .advance_watermark_to(20 * 60)
              .add_elements([inp("u1", 5 * MIN, 4, amount=100)])  # later than allowed lateness -> dead letter
              .advance_watermark_to(3 * 3600)  # 1h window empties; TTL (2m30s + 2h) fires -> final rows
              .add_elements([inp("u1", 3 * 3600 * S + 10 * S, 5, amount=2)])  # the key comes back: new state
              .advance_processing_time(120)
              .advance_watermark_to(END))

    def check_rows(rows):
        life = [r[2:] for r in _rows_for(rows, "u1", "lifetime")]
        hour = [r[2:] for r in _rows_for(rows, "u1", "1h")]
        clock1 = 2 * MIN + 30 * S + 1  # rows reflect events before the key's clock (exclusive)
        ttl1 = 2 * MIN + 30 * S + 2 * 3600 * S
        clock2 = 3 * 3600 * S + 10 * S + 1
        ttl2 = clock2 - 1 + 2 * 3600 * S
        assert [(m, wm, final) for m, wm, v, final in life] == [
            ({"n": 2, "amount": 12, "plan": "free"}, clock1, False),  # early pane (cadence), never one with n=1
            ({"n": 3, "amount": 13, "plan": "pro"}, 3 * MIN, False),  # late pane: 1m30s event, 'pro' is latest
            ({"n": 3, "amount": 13, "plan": "pro"}, ttl1, True),  # TTL: final; the too-late event never counted
            ({"n": 1, "amount": 2, "plan": None}, clock2, False),  # the key is back: fresh state
            ({"n": 1, "amount": 2, "plan": None}, ttl2, True),
        ]
        assert [(m["n"], wm, final) for m, wm, v, final in hour] == [
            (2, clock1, False),  # early
            (2, 3 * MIN, False),  # on-time: the watermark passed 3m, bucket [2m, 3m) complete
            (3, 3 * MIN, False),  # late pane
            (1, 62 * MIN, False), (0, 63 * MIN, False),  # window close: buckets leave the 1h window
            (0, ttl1, True),
            (1, clock2, False), (1, clock2 - 1 - 10 * S + MIN, False), (0, clock2 - 1 - 10 * S + 61 * MIN, False),
            (0, ttl2, True),
        ]
        for series in (life, hour):  # versions strictly increase per (key, window), across the TTL too
            vs = [v for m, wm, v, final in series]
            assert vs == sorted(set(vs))

    _run(stream, check_rows, equal_to_per_window({GlobalWindow(): [("late", 5 * MIN, "Aggregate/AggregatePerKey")]}))


def test_processing_time_cadence_emits_only_on_change():
    stream = (TestStream()
              .advance_processing_time(START).advance_watermark_to(0)
              .add_elements([inp("a", 10 * S, 1, amount=1), inp("b", 10 * S, 2, amount=1)])
              .advance_processing_time(59)  # not yet
              .add_elements([inp("a", 20 * S, 3, amount=1)])
              .advance_processing_time(2)  # 61 s: one pane per key and window
              .advance_processing_time(300)  # no change: no pane
              .add_elements([inp("a", 30 * S, 4, amount=1)])
              .advance_processing_time(61)  # a changed: one more pane for a only
              .advance_watermark_to(60))  # the stream stays open: no TTL yet (pipeline end fires it)

    def check_rows(rows):
        early = sorted((r[0], r[1], r[2]["n"], r[3]) for r in rows if r[3] < 60 * S)
        # one pane per key and window at the first cadence tick (a's second event included: nothing fired
        # at 59 s), none while nothing changed, then one more for 'a' only
        assert early == [("a", "1h", 2, 20 * S + 1), ("a", "1h", 3, 30 * S + 1),
                         ("a", "lifetime", 2, 20 * S + 1), ("a", "lifetime", 3, 30 * S + 1),
                         ("b", "1h", 1, 10 * S + 1), ("b", "lifetime", 1, 10 * S + 1)]

    _run(stream, check_rows, equal_to([]))


def test_ttl_expiry_clears_state_and_emits_final():
    stream = (TestStream()
              .advance_processing_time(START).advance_watermark_to(0)
              .add_elements([inp("u", 5 * S, 1, amount=4), inp("u", 7 * S, 2, amount=6)])
              .advance_watermark_to(2 * 3600 + 8)  # past 7 s + 2 h: TTL
              .add_elements([inp("u", 2 * 3600 * S + 9 * S, 3, amount=1)])
              .advance_processing_time(61)
              .advance_watermark_to(END))

    def check_rows(rows):
        finals = sorted((r[1], r[2]["n"], r[2]["amount"], r[3]) for r in rows if r[5])
        ttl1 = 7 * S + 2 * 3600 * S
        assert ("lifetime", 2, 10, ttl1) in finals and ("1h", 0, None, ttl1) in finals
        after = [r for r in rows if r[1] == "lifetime" and r[3] == 2 * 3600 * S + 9 * S + 1]
        assert after and after[0][2]["n"] == 1  # cleared: the old 2 events are gone

    _run(stream, check_rows, equal_to([]))


def test_bad_config_fails_at_construction():
    with pytest.raises(ValueError, match="spec.name"):
        ComputeAggregates({("p", "other"): SPEC})
    with pytest.raises(ValueError, match="at least one"):
        ComputeAggregates({})
