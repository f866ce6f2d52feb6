"""ingest.runner: tuning of the process that runs a local streaming job's SDK workers (issue 13)."""
from __future__ import annotations

import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.worker import bundle_processor as bp
from apache_beam.runners.worker import sdk_worker

from ingest import runner


@pytest.fixture
def untuned(monkeypatch):
    """Whatever a test tunes is undone afterwards (the tuning is process-wide)."""
    monkeypatch.setattr(sdk_worker.SdkWorker, "process_bundle_progress", sdk_worker.SdkWorker.process_bundle_progress)
    monkeypatch.setattr(bp.FnApiUserStateContext, "commit", bp.FnApiUserStateContext.commit)
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


class _Handler:
    """Records the state requests of a commit and when their replies were awaited."""

    def __init__(self):
        self.log = []

    def _future(self, what):
        log = self.log

        class F:
            def get(self):
                log.append(("wait", what))

        return F()

    def clear(self, key):
        self.log.append(("clear", key))
        return self._future(("clear", key))

    def extend(self, key, coder, elements):
        self.log.append(("extend", key, list(elements)))
        return self._future(("extend", key))


def test_state_commits_are_sent_together_then_awaited(untuned):
    """Beam commits cell after cell, waiting for each reply; tuned, every cell's requests go out first
    (in the same per-cell order: clear, then the new value), then the replies are awaited."""
    from apache_beam.coders import BytesCoder

    runner.tune_local_streaming_worker([])
    h = _Handler()
    ctx = bp.FnApiUserStateContext.__new__(bp.FnApiUserStateContext)
    cells = {}
    for k in ("a", "b", "c"):
        bag = bp.SynchronousBagRuntimeState(h, k, BytesCoder())
        cell = bp.ReadModifyWriteRuntimeState(bag)
        cell.write(k.encode())
        cells[k] = cell
    untouched = bp.SynchronousBagRuntimeState(h, "d", BytesCoder())  # read only: nothing to send
    ctx._all_states = {**cells, "d": untouched}
    ctx.commit()
    sent = [e for e in h.log if e[0] != "wait"]
    assert sent == [("clear", "a"), ("extend", "a", [b"a"]), ("clear", "b"), ("extend", "b", [b"b"]),
                    ("clear", "c"), ("extend", "c", [b"c"])]
    first_wait = next(i for i, e in enumerate(h.log) if e[0] == "wait")
    assert first_wait == len(sent), h.log  # nothing awaited before every request was sent
    assert [e[1] for e in h.log[first_wait:]] == [("extend", "a"), ("extend", "b"), ("extend", "c")]


def test_state_is_mirrored_only_where_it_lives_in_this_process():
    """state.mirror is exact only when this process writes all of the job's state and Prism runs one
    bundle per key at a time: Prism with LOOPBACK workers and its splits disabled."""
    from ingest.pipeline import _state_in_this_process

    local = ["--runner=PrismRunner", "--environment_type=LOOPBACK", "--streaming"]
    a = _state_in_this_process(PipelineOptions([*local, "--experiments=prism_disable_sdf_split"]))
    b = _state_in_this_process(PipelineOptions([*local, "--experiments=prism_disable_sdf_split"]))
    assert a and b and a != b  # one token per job
    assert _state_in_this_process(PipelineOptions(local)) is None  # splits allowed
    assert _state_in_this_process(PipelineOptions(["--runner=PrismRunner", "--environment_type=DOCKER",
                                                   "--experiments=prism_disable_sdf_split"])) is None
    assert _state_in_this_process(PipelineOptions(["--runner=DataflowRunner", "--streaming"])) is None
    assert _state_in_this_process(PipelineOptions(["--runner=FnApiRunner"])) is None
