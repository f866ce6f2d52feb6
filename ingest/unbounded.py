"""Pieces shared by headwater's unbounded splittable-DoFn sources (Kafka, Pub/Sub pull)."""
from __future__ import annotations

import threading
from typing import Callable

from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import WatermarkEstimatorProvider
from apache_beam.utils.timestamp import Timestamp

__all__ = ["ManualWatermarks", "advance_watermark", "run_later", "nothing"]


class ManualWatermarks(WatermarkEstimatorProvider):
    """A manual watermark estimator per restriction; the DoFn advances it from element timestamps."""

    def initial_estimator_state(self, element, restriction):
        return None

    def create_watermark_estimator(self, estimator_state):
        return ManualWatermarkEstimator(estimator_state)


def advance_watermark(estimator: ManualWatermarkEstimator, ts: Timestamp) -> None:
    """Move the watermark forward to ``ts``; never backwards."""
    current = estimator.current_watermark()
    if current is None or ts > current:
        estimator.set_watermark(ts)


def nothing() -> None:
    """A finalization callback with nothing to commit or ack."""
    return None


def run_later(delay_s: float, action: Callable[[], None]) -> None:
    """Run ``action`` after ``delay_s`` on a daemon timer. A killed job never runs it, so the
    source replays (Kafka) or the broker redelivers (Pub/Sub): duplicates, which dedup removes, never loss."""
    timer = threading.Timer(delay_s, action)
    timer.daemon = True
    timer.start()
