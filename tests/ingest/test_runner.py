"""ingest.runner: tuning of the process that runs a local streaming job's SDK workers (issue 13)."""
from __future__ import annotations

import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.worker import sdk_worker

from ingest import runner


@pytest.fixture
def untuned(monkeypatch):
    """Whatever a test tunes is undone afterwards (the tuning is process-wide)."""
    monkeypatch.setattr(sdk_worker.SdkWorker, "process_bundle_progress", sdk_worker.SdkWorker.process_bundle_progress)
    monkeypatch.setattr(runner, "_tuned", False)
    monkeypatch.delenv("HEADWATER_LOCAL_TUNING", raising=False)
    interval = sys.getswitchinterval()
    yield
    sys.setswitchinterval(interval)


class _Calls:
    """Stands in for the SDK worker: counts the real progress replies."""

    def __init__(self):
        self.n = 0


def test_progress_replies_carry_metrics_at_most_every_interval(untuned, monkeypatch):
    calls = _Calls()

    def real(self, request, instruction_id):
        calls.n += 1
        return beam_fn_api_pb2.InstructionResponse(instruction_id=instruction_id,
                                                   process_bundle_progress=beam_fn_api_pb2.ProcessBundleProgressResponse(
                                                       consuming_received_data=True))

    monkeypatch.setattr(sdk_worker.SdkWorker, "process_bundle_progress", real)
    runner.tune_local_streaming_worker(["prism_disable_sdf_split"])
    assert sys.getswitchinterval() <= runner.LOCAL_SWITCH_INTERVAL_S
    patched = sdk_worker.SdkWorker.process_bundle_progress
    assert patched is not real and patched.__wrapped__ is real
    first = patched(None, beam_fn_api_pb2.ProcessBundleProgressRequest(instruction_id="b1"), "i1")
    assert calls.n == 1 and first.process_bundle_progress.consuming_received_data
    for k in range(20):  # Prism's 100 ms ticks within the interval: empty replies, no metrics walk
        resp = patched(None, beam_fn_api_pb2.ProcessBundleProgressRequest(instruction_id="b1"), f"i{k + 2}")
        assert resp.instruction_id == f"i{k + 2}"
        assert resp.HasField("process_bundle_progress") and not resp.process_bundle_progress.monitoring_infos
    assert calls.n == 1
    runner.tune_local_streaming_worker(["prism_disable_sdf_split"])  # idempotent: not wrapped twice
    assert sdk_worker.SdkWorker.process_bundle_progress is patched


def test_progress_untouched_when_prism_may_split(untuned):
    """Prism's split decision reads the progress replies: with splits allowed they stay as Beam makes them."""
    before = sdk_worker.SdkWorker.process_bundle_progress
    runner.tune_local_streaming_worker([])
    assert sdk_worker.SdkWorker.process_bundle_progress is before
    assert sys.getswitchinterval() <= runner.LOCAL_SWITCH_INTERVAL_S


def test_tuning_off_for_measurements(untuned, monkeypatch):
    monkeypatch.setenv("HEADWATER_LOCAL_TUNING", "0")
    sys.setswitchinterval(0.005)
    before = sdk_worker.SdkWorker.process_bundle_progress
    runner.tune_local_streaming_worker(["prism_disable_sdf_split"])
    assert sdk_worker.SdkWorker.process_bundle_progress is before
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_pipeline_tunes_only_prism_loopback(untuned, monkeypatch):
    from ingest.pipeline import _tune_local_worker

    seen = []
    monkeypatch.setattr(runner, "tune_local_streaming_worker", lambda exps: seen.append(list(exps)))
    _tune_local_worker(PipelineOptions(["--runner=PrismRunner", "--environment_type=LOOPBACK",
                                        "--experiments=prism_disable_sdf_split", "--streaming"]))
    _tune_local_worker(PipelineOptions(["--runner=PrismRunner", "--environment_type=DOCKER", "--streaming"]))
    _tune_local_worker(PipelineOptions(["--runner=DataflowRunner", "--streaming"]))
    assert seen == [["prism_disable_sdf_split"]]
