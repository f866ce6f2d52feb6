"""Prism 2.77 loses state updates when it splits a bundle of a stateful stage; headwater's route around it.

A reproduction without any headwater code: a splittable source of N elements over K keys (pausing
every few hundred elements, which makes Prism see a slow bundle and split) -> a stateful DoFn
counting per key in a ReadModifyWriteState -> at the end of the stream (event-time timer) each
key's count. Exact per-key counts are asserted.

Cause (docs/streaming.md, "Prism splits and per-key state"): ``splitBundle`` in Prism's
``engine/elementmanager.go`` deletes the residual's keys from ``inprogressKeys``, so a new bundle
may take a key whose state the primary bundle still holds; the primary later writes back a
count that misses the new bundle's updates. ``--experiments=prism_disable_sdf_split`` gates the
only split request Prism makes (``stage.go``, every stage, not only SDFs), so no bundle is split.

``test_counts_are_exact_with_headwaters_options`` runs with ``ingest.runner.runner_options`` (the
experiment included) and must be exact. ``bench/prism_split_bench.py`` runs the same pipeline
with and without the experiment and prints how many keys came out short and the throughput of
both (the figures in docs/streaming.md): without the route it fails, but whether Prism splits
depends on timing, so that half is a measurement, not a test.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow

from ingest.runner import PRISM_EXPERIMENTS, runner_options, stop_local_runners

N = int(os.environ.get("HEADWATER_PRISM_SPLIT_N", "20000"))
KEYS = 200
PAUSE_EVERY = 500
PAUSE_S = 0.3

_LOCK = threading.Lock()


class _Range(RestrictionProvider):
    def initial_restriction(self, n):
        return OffsetRange(0, n)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, n, restriction):
        return restriction.size()


class _Emit(beam.DoFn):
    """n -> (key, i) for i in [0, n): a splittable source (Prism may split its bundles)."""

    def process(self, n, tracker=beam.DoFn.RestrictionParam(_Range())):
        i = tracker.current_restriction().start
        while tracker.try_claim(i):
            if i and i % PAUSE_EVERY == 0:
                time.sleep(PAUSE_S)  # a slow bundle: Prism's progress check splits it
            yield f"k{i % KEYS:03d}", i
            i += 1


class _CountPerKey(beam.DoFn):
    COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())
    DONE = TimerSpec("done", TimeDomain.WATERMARK)

    def setup(self):
        self._seen = 0

    def process(self, kv, count=beam.DoFn.StateParam(COUNT), done=beam.DoFn.TimerParam(DONE)):
        self._seen += 1
        if self._seen % PAUSE_EVERY == 0:
            time.sleep(PAUSE_S)  # a slow bundle of the stateful stage: the split that loses updates
        count.write((count.read() or 0) + 1)
        done.set(GlobalWindow().max_timestamp())

    @on_timer(DONE)
    def _final(self, key=beam.DoFn.KeyParam, count=beam.DoFn.StateParam(COUNT)):
        yield key, count.read() or 0


class _Append(beam.DoFn):
    def __init__(self, path: str):
        self._path = path

    def process(self, kv):
        with _LOCK, open(self._path, "a") as fh:
            fh.write(f"{kv[0]} {kv[1]}\n")


def _run(argv: list[str], out: str) -> tuple[dict[str, int], float]:
    # Beam's PrismRunner shares ONE job server per process (PrismRunner.shared_handle), built with the
    # options of the first Prism job: after an earlier test's DirectRunner tried Prism without
    # --prism_location, this job would reuse that server and try to download Prism from GitHub (seen in the
    # full suite). A fresh server with this job's options:
    stop_local_runners()
    started = time.monotonic()
    p = beam.Pipeline(options=PipelineOptions(argv))
    _ = (p
         | "Impulse" >> beam.Create([N])
         | "Emit" >> beam.ParDo(_Emit())
         | "Count" >> beam.ParDo(_CountPerKey())
         | "Write" >> beam.ParDo(_Append(out)))
    p.run().wait_until_finish()
    elapsed = time.monotonic() - started
    got: dict[str, int] = {}
    with open(out) as fh:
        for line in fh:
            k, v = line.split()
            assert k not in got, f"key {k} emitted twice"
            got[k] = int(v)
    return got, elapsed


def _expected() -> dict[str, int]:
    return dict(Counter(f"k{i % KEYS:03d}" for i in range(N)))


def _without_experiments(argv: list[str]) -> list[str]:
    return [a for a in argv if a.split("=", 1)[-1] not in PRISM_EXPERIMENTS]


@pytest.mark.integration
def test_counts_are_exact_with_headwaters_options(tmp_path):
    argv = runner_options(True, [])
    assert any(a == "--experiments=prism_disable_sdf_split" for a in argv)
    got, elapsed = _run(argv, str(tmp_path / "counts.txt"))
    expected = _expected()
    short = {k: (got.get(k, 0), n) for k, n in expected.items() if got.get(k, 0) != n}
    print(f"prism, splits disabled: {len(expected) - len(short)}/{len(expected)} keys exact, {elapsed:.1f}s")
    assert not short, f"{len(short)} keys not exact (got, expected): {dict(list(short.items())[:10])}"
