"""BatchPerKey: Beam's GroupIntoBatches with typed state (no pickled coder in the graph).

Beam 2.77's ``GroupIntoBatches.expand`` asks the registry for the coder of the *PCollection object*
(``coders.registry.get_coder(pcoll)``), not of its element type, so its ``values`` bag and its
``count`` cell are always ``FastPrimitivesCoder`` (pickle) whatever the input is typed as. A pickled
state coder is what makes Dataflow refuse an update ("The Coder or type for step ... has changed",
apache/beam#30357). Same semantics here (flush when ``batch_size`` elements are buffered, after
``max_buffering_s`` of processing time since the first one, and at the end of the window), with
the state typed from the input's element type: ``values`` is the element's KV coder, ``count`` a
varint. State and timer names are Beam's.

``PCollection[KV[str, V]] -> PCollection[KV[str, Iterable[V]]]`` (windows preserved).
"""
from __future__ import annotations

import time
from typing import Callable

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.combiners import CountCombineFn
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, CombiningValueStateSpec, TimerSpec, on_timer
from apache_beam.typehints import typehints

__all__ = ["BatchPerKey"]

BUFFER_LABEL = "Buffer"


def _batching_fn(element_coder: beam.coders.Coder, batch_size: int, max_buffering_s: float,
                 clock: Callable[[], float]) -> beam.DoFn:
    values_spec = BagStateSpec("values", element_coder)
    count_spec = CombiningValueStateSpec("count", VarIntCoder(), CountCombineFn())
    window_timer = TimerSpec("window_end", TimeDomain.WATERMARK)
    buffering_timer = TimerSpec("buffering_end", TimeDomain.REAL_TIME)

    class _BatchFn(beam.DoFn):
        def process(self, element, window=beam.DoFn.WindowParam, values=beam.DoFn.StateParam(values_spec),
                    count=beam.DoFn.StateParam(count_spec), end=beam.DoFn.TimerParam(window_timer),
                    buffering=beam.DoFn.TimerParam(buffering_timer)):
            end.set(window.end)
            values.add(element)
            count.add(1)
            n = count.read()
            if n == 1 and max_buffering_s > 0:
                buffering.set(clock() + max_buffering_s)
            if n >= batch_size:
                yield from self._flush(values, count, buffering)

        @on_timer(window_timer)
        def _on_window_end(self, values=beam.DoFn.StateParam(values_spec), count=beam.DoFn.StateParam(count_spec),
                           buffering=beam.DoFn.TimerParam(buffering_timer)):
            yield from self._flush(values, count, buffering)

        @on_timer(buffering_timer)
        def _on_buffering_end(self, values=beam.DoFn.StateParam(values_spec),
                              count=beam.DoFn.StateParam(count_spec),
                              buffering=beam.DoFn.TimerParam(buffering_timer)):
            yield from self._flush(values, count, buffering)

        @staticmethod
        def _flush(values, count, buffering):
            batch = list(values.read())
            if not batch:
                return
            values.clear()
            count.clear()
            buffering.clear()
            yield batch[0][0], [v for _, v in batch]

    return _BatchFn()


class BatchPerKey(beam.PTransform):
    """``PCollection[KV[str, V]]`` (V typed, e.g. a Row record) -> ``PCollection[KV[str, Iterable[V]]]``."""

    def __init__(self, batch_size: int, max_buffering_s: float, clock: Callable[[], float] = time.time,
                 label: str | None = None):
        super().__init__(label)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_buffering_s < 0:
            raise ValueError(f"max_buffering_s must be >= 0, got {max_buffering_s}")
        self._size = batch_size
        self._max_buffering_s = max_buffering_s
        self._clock = clock

    def expand(self, pcoll):
        element_type = pcoll.element_type
        try:
            key_type, value_type = element_type.tuple_types
        except AttributeError:
            raise TypeError(f"BatchPerKey needs a typed KV input, got {element_type!r}") from None
        coder = beam.coders.registry.get_coder(element_type)
        return pcoll | BUFFER_LABEL >> beam.ParDo(
            _batching_fn(coder, self._size, self._max_buffering_s, self._clock)
        ).with_output_types(typehints.KV[key_type, typehints.Iterable[value_type]])
