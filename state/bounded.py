"""``FinalAggregates``: bounded per-key aggregates as a lifted combine, one final row per (key, window).

Input: ``PCollection[((partner, aggregate, key), item)]`` in the global window, bounded, where
``item`` is either one event ``(event_time_us, event_id, values dict)`` (``partials=False``) or a
partial accumulator of ``state.combine`` (``partials=True``: an upstream step already folded some
events, e.g. ``ingest.bounded``'s per-shard dedup). Output: ``PCollection[AggregateRow]``, the final
rows (``final=True``) as of each key's TTL deadline, equal to what the stream's state emits for the
same events (``state/combine.py`` says why and ``tests/state/test_combine.py`` checks it).

Beam lifts the combine: partial accumulators are built before the shuffle (per bundle), merged
after it; only one accumulator per key crosses the shuffle per bundle, not one element per event.
Type conflicts are not seen here: the step that builds the items reports them (every event passes
through it exactly once), because a combine has no second output.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping, Tuple

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics

from flatten.records import AggregateRow
from state import aggregate as A
from state import combine as C
from state.spec import AggregateSpec

__all__ = ["FinalAggregates", "COMBINE_LABEL", "ROWS_LABEL"]

AggKey = Tuple[str, str, str]
COMBINE_LABEL = "CombinePerKey"
ROWS_LABEL = "FinalRows"


class _CombineBase(beam.CombineFn):
    def __init__(self, specs: Mapping[tuple[str, str], AggregateSpec]):
        self._specs = dict(specs)
        self._plans: dict[tuple[str, str], A.Plan] = {}

    def setup(self, *args, **kwargs) -> None:
        self._plans = {k: A.plan_for(s) for k, s in self._specs.items()}

    def _plan(self, key: AggKey) -> A.Plan:
        plan = self._plans.get((key[0], key[1]))
        if plan is None:  # setup() is not called by every runner path (e.g. CombineValues in a test)
            plan = self._plans[(key[0], key[1])] = A.plan_for(self._specs[(key[0], key[1])])
        return plan

    # The accumulator is (key, partial): the plan depends on the key, and a CombineFn's methods do not
    # see it. None until the first input.
    def create_accumulator(self) -> Any:
        return None

    def merge_accumulators(self, accumulators) -> Any:
        out = None
        for acc in accumulators:
            if acc is None:
                continue
            if out is None:
                out = acc
                continue
            plan = self._plan(out[0])
            out = (out[0], C.merge_partials(out[1], acc[1], plan))
        return out

    def compact(self, accumulator: Any) -> Any:
        return accumulator

    def extract_output(self, accumulator: Any) -> Any:
        return accumulator


class _EventsCombineFn(_CombineBase):
    """Inputs: ``(key, (event_time_us, event_id, values))`` as the value (the key is repeated so the
    accumulator knows its plan)."""

    def add_input(self, acc, item):
        key, (t_us, event_id, values) = item
        if acc is None:
            acc = (key, C.new_partial(self._plan(key)))
        C.add_event(acc[1], t_us, event_id, values, self._plan(key))  # type conflicts: reported upstream
        return acc


class _PartialsCombineFn(_CombineBase):
    """Inputs: ``(key, partial)``: already folded pieces."""

    def add_input(self, acc, item):
        if acc is None:
            return item
        return (acc[0], C.merge_partials(acc[1], item[1], self._plan(acc[0])))


def _with_key(kv):
    key, item = kv
    return key, (key, item)


class _FinalRowsFn(beam.DoFn):
    def __init__(self, specs: Mapping[tuple[str, str], AggregateSpec], clock: Callable[[], float]):
        self._specs = dict(specs)
        self._clock = clock
        self._rows = Metrics.counter("headwater.state", "rows_emitted")

    def setup(self) -> None:
        self._plans = {k: A.plan_for(s) for k, s in self._specs.items()}

    def process(self, kv) -> Iterator[AggregateRow]:
        key, acc = kv
        if acc is None:
            return
        plan = self._plans[(key[0], key[1])]
        now = int(self._clock() * 1_000_000)
        for r in C.final_rows(acc[1], plan):
            self._rows.inc()
            yield AggregateRow(partner=key[0], aggregate=key[1], key=key[2], window=r.window,
                               metrics=orjson.dumps(r.metrics), watermark_us=r.watermark_us,
                               version=r.version, emitted_us=now, final=True)


class FinalAggregates(beam.PTransform):
    """PCollection[(AggKey, event or partial)] -> PCollection[AggregateRow] (final rows only). Bounded input."""

    def __init__(self, specs: Mapping[tuple[str, str], AggregateSpec], partials: bool = False,
                 clock: Callable[[], float] = time.time, label: str = "FinalAggregates"):
        super().__init__(label)
        if not specs:
            raise ValueError("FinalAggregates needs at least one (partner, aggregate) spec")
        self._specs = dict(specs)
        self._partials = partials
        self._clock = clock

    def expand(self, pcoll):
        fn = _PartialsCombineFn(self._specs) if self._partials else _EventsCombineFn(self._specs)
        return (pcoll
                | "KeyedItems" >> beam.Map(_with_key).with_output_types(Tuple[AggKey, Tuple[AggKey, Any]])
                | COMBINE_LABEL >> beam.CombinePerKey(fn).with_output_types(Tuple[AggKey, Any])
                | ROWS_LABEL >> beam.ParDo(_FinalRowsFn(self._specs, self._clock)).with_output_types(AggregateRow))
