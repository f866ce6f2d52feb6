"""Which Beam runner runs a headwater job, and with which options.

The local streaming runner is **Prism** (``--runner=PrismRunner``) with a
locally installed binary (``--prism_location``). Why (measured, see
docs/streaming.md):

* The bundle-based DirectRunner cannot run unbounded splittable DoFns
  (apache/beam#26577: "... was not replaced as expected"), so it cannot run the
  Kafka source (or any SDF source) at all.
* Prism runs unbounded SDFs, bundle finalization (offset commits / acks after
  durable output), event- and processing-time timers and state.
* Prism rejects Python's runner-native ReadFromPubSub
  (``unsupported feature ... beam:transform:pubsub_read:v1``), so on Prism the
  Pub/Sub source is headwater's pulling SDF (``ingest.pubsub_source``), and
  the native read is used only where it runs: Dataflow and the DirectRunner.
* Naming the binary skips Beam's attempt to download Prism from GitHub
  (DirectRunner and PrismRunner do that since 2.68), which fails offline.

Batch contracts keep whatever the caller chose (the pipeline picks FnApiRunner).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["runner_options", "uses_native_pubsub", "commit_mode", "find_prism", "PrismNotFound",
           "NATIVE_PUBSUB_RUNNERS", "PRISM_EXPERIMENTS", "supervised_prism", "stop_local_runners",
           "LocalRunnerConfigError", "tune_local_streaming_worker"]

#: Runners on which Beam's own ReadFromPubSub works (Dataflow: native; DirectRunner: _DirectReadFromPubSub).
NATIVE_PUBSUB_RUNNERS = frozenset({
    "DataflowRunner", "TestDataflowRunner", "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner",
})

#: Runners whose bundle finalization follows a *durable* commit of the bundle's output.
DURABLE_FINALIZATION_RUNNERS = frozenset({"DataflowRunner", "TestDataflowRunner"})

#: Experiments headwater passes to Prism. ``prism_disable_sdf_split``: Prism 2.77 loses state
#: updates when it splits a bundle of a stateful stage (``splitBundle`` releases the residual's
#: keys while the primary bundle still holds their state; docs/streaming.md has the evidence).
#: Despite its name the experiment turns off every dynamic split Prism makes (the only split
#: request in Prism is gated by it, for all stages), which is what keeps per-key state exact.
PRISM_EXPERIMENTS = ("prism_disable_sdf_split",)

_ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = _ROOT / "deploy" / "local" / "install_prism.sh"


class PrismNotFound(RuntimeError):
    """No Prism binary: terminal until one is installed (the message says how)."""


class LocalRunnerConfigError(ValueError):
    """Options the local runner cannot honour exactly-once with; the message names the option."""


def _flag(argv: Sequence[str], name: str) -> Optional[str]:
    """Value of ``--name=v`` or ``--name v`` in argv (last wins), else None."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def find_prism(env: Optional[dict[str, str]] = None) -> Optional[str]:
    """The Prism binary to use, or None. Reads the environment and the filesystem only.

    Order: $HEADWATER_PRISM, $HEADWATER_LOCAL/bin/prism (default ./.local, what
    deploy/local/install_prism.sh installs), ``prism`` on PATH, ~/go/bin/prism.
    """
    env = dict(os.environ) if env is None else env
    local = Path(env.get("HEADWATER_LOCAL") or (_ROOT / ".local"))
    candidates = [env.get("HEADWATER_PRISM"), str(local / "bin" / "prism"), shutil.which("prism"),
                  str(Path.home() / "go" / "bin" / "prism")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _experiments(argv: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for i, a in enumerate(argv):
        value = None
        if a.startswith("--experiments=") or a.startswith("--experiment="):
            value = a.split("=", 1)[1]
        elif a in ("--experiments", "--experiment") and i + 1 < len(argv):
            value = argv[i + 1]
        if value:
            out.update(v.strip() for v in value.split(","))
    return out


def runner_options(contract_is_streaming: bool, user_argv: list[str], prism: Optional[str] = None) -> list[str]:
    """Beam argv for a job: the user's argv plus headwater's local defaults.

    Streaming contracts without ``--runner`` get ``--runner=PrismRunner``,
    ``--prism_location`` (``prism`` or :func:`find_prism`, started through
    :func:`supervised_prism` so it never outlives the job), ``--environment_type=LOOPBACK``
    (workers in this process, so PUBSUB_EMULATOR_HOST and credentials apply),
    ``--experiments=prism_disable_sdf_split`` (:data:`PRISM_EXPERIMENTS`) and
    ``--streaming``. A user's ``--runner`` (DataflowRunner, ...) and any
    option already given are kept as is. Batch argv is returned unchanged.
    Raises PrismNotFound when Prism would be used but no binary is found.
    """
    argv = list(user_argv)
    if not contract_is_streaming:
        return argv
    runner = _flag(argv, "runner")
    extra: list[str] = []
    if runner is None:
        extra.append("--runner=PrismRunner")
        runner = "PrismRunner"
    if runner in ("PrismRunner", "prism"):
        if _flag(argv, "prism_location") is None:
            location = prism or find_prism()
            if location is None:
                raise PrismNotFound(
                    "the local streaming runner needs Prism (Beam's Go runner) and none was found; install it with "
                    f"'{INSTALL_SCRIPT.relative_to(_ROOT)}' (needs Go), or set HEADWATER_PRISM, "
                    "or pass --prism_location=PATH")
            extra.append(f"--prism_location={supervised_prism(location)}")
        if _flag(argv, "environment_type") is None:
            extra.append("--environment_type=LOOPBACK")
        have = _experiments(argv)
        if os.environ.get("HEADWATER_PRISM_ALLOW_SPLITS") != "1":  # measurements only: aggregates may drift
            extra += [f"--experiments={e}" for e in PRISM_EXPERIMENTS if e not in have]
    if "--streaming" not in argv and _flag(argv, "streaming") is None:
        extra.append("--streaming")
    return [*extra, *argv]


def uses_native_pubsub(options: Any) -> bool:
    """True when the job's runner executes Beam's own ReadFromPubSub (Dataflow, DirectRunner).

    ``options`` is a PipelineOptions. No ``--runner`` means Beam's default, the DirectRunner.
    """
    name = _runner_name(options)
    return name is None or name in NATIVE_PUBSUB_RUNNERS


def _runner_name(options: Any) -> Optional[str]:
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner if options is not None else None
    if runner is None:
        return None
    name = runner if isinstance(runner, str) else type(runner).__name__
    return name.rsplit(".", 1)[-1]


def commit_mode(options: Any) -> str:
    """How a live source commits offsets / acks messages on this job's runner.

    * ``"finalize"`` on Dataflow: bundle finalization follows the durable commit of the bundle's
      output, so the sources commit in the finalizer.
    * ``"ledger"`` everywhere else (Prism keeps in-flight data in memory only): the sources commit
      what ``sinks.ledger`` reports durable in the warehouse. That ledger lives in the launching
      process, so the SDK workers must run there (``--environment_type=LOOPBACK``, headwater's
      default on Prism); other environment types fail here, at launch, naming the option.
    """
    from apache_beam.options.pipeline_options import PortableOptions

    name = _runner_name(options)
    if name in DURABLE_FINALIZATION_RUNNERS:
        return "finalize"
    env = options.view_as(PortableOptions).environment_type if options is not None else None
    if name in ("PrismRunner", "prism", "PortableRunner", "FlinkRunner", "SparkRunner") and env not in (
            None, "LOOPBACK"):
        raise LocalRunnerConfigError(
            f"--environment_type={env}: on a local runner headwater commits Kafka offsets and acks Pub/Sub "
            "messages only after the warehouse has written them, which it tracks in the launching process; "
            "use --environment_type=LOOPBACK (the default) or run on Dataflow")
    return "ledger"


# -- Prism's lifetime ------------------------------------------------------------------------------
_SUPERVISOR = """#!{python} -S
# headwater's Prism supervisor (generated by ingest/runner.py; safe to delete).
# Beam starts this instead of Prism itself. It starts Prism with a parent-death signal (Prism dies
# with this process, even on SIGKILL), forwards SIGINT/SIGTERM to it, and stops it as soon as the
# job process that started this one is gone, however it ended (SIGKILL, os._exit, a crash).
import ctypes, os, signal, subprocess, sys

PRISM = {prism!r}
parent = os.getppid()
libc = ctypes.CDLL(None, use_errno=True)


def _die_with_me():
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


proc = subprocess.Popen([PRISM, *sys.argv[1:]], preexec_fn=_die_with_me)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda s, _f: proc.send_signal(s))
while True:
    try:
        proc.wait(timeout=0.2)
        break
    except subprocess.TimeoutExpired:
        pass
    if os.getppid() != parent:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        break
sys.exit(proc.returncode if proc.returncode and proc.returncode > 0 else 0)
"""


def supervised_prism(binary: str) -> str:
    """Path of an executable that runs ``binary`` (Prism) supervised (see ``_SUPERVISOR``).

    Written once per (Python, binary) into ``$TMPDIR/headwater-<uid>/``. Beam's own stop
    (SIGINT at interpreter exit) still works: the supervisor forwards it.
    """
    import hashlib
    import sys
    import tempfile

    text = _SUPERVISOR.format(python=sys.executable, prism=os.path.abspath(binary))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"headwater-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"prism-supervised-{digest}"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return str(path)


def stop_local_runners() -> None:
    """Stop every runner process Beam started in this process (Prism's job server): a job that has
    ended leaves nothing running. Safe to call when none was started."""
    from apache_beam.utils.subprocess_server import SubprocessServer

    cache = SubprocessServer._cache  # Beam's registry of started servers (cmd, port) -> process
    for key in list(getattr(cache, "_cache", {})):
        try:
            cache.force_remove(*key)
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        from apache_beam.runners.portability.prism_runner import PrismRunner

        PrismRunner.shared_handle = type(PrismRunner.shared_handle)()  # the next job starts a fresh server
    except Exception:  # noqa: BLE001
        pass


# -- the local streaming job's own process (Prism, LOOPBACK workers) ---------------------------------
#: GIL switch interval while a local streaming job runs in this process (Python's default: 5 ms). Every
#: per-key state read of the stateful steps (dedup's flag, the aggregate's cell) is a blocking round trip
#: to Prism whose reply is handled by another thread of this process; with the default interval that
#: thread waits up to 5 ms for the GIL whenever a busy thread (a source's poll, the sink, progress
#: replies) holds it, which capped each stateful stage at ~200 elements/s (bench/README.md "Live path").
LOCAL_SWITCH_INTERVAL_S = 0.0005
#: Prism asks every running bundle for progress every 100 ms; the SDK answers with every metric of the
#: bundle's transforms, which was ~half the job's CPU samples. Prism uses the reply for tentative metrics
#: and for its split decision only, and headwater disables Prism's splits (PRISM_EXPERIMENTS): a reply
#: carries the metrics at most this often per process, empty otherwise (final metrics are unaffected).
LOCAL_PROGRESS_METRICS_EVERY_S = 5.0
_tuned = False


def tune_local_streaming_worker(experiments: Sequence[str]) -> None:
    """Adjust this process for a local streaming job whose SDK workers run here (Prism, LOOPBACK): the GIL
    switch interval, state commits sent together (``_pipeline_state_commits``) and cheap progress replies
    (see the constants). ``experiments``: the job's Beam
    experiments. Progress replies are left alone when Prism may split (``HEADWATER_PRISM_ALLOW_SPLITS=1``,
    i.e. no ``prism_disable_sdf_split``): its split
    decision reads them. Idempotent; ``HEADWATER_LOCAL_TUNING=0`` turns it off (measurements)."""
    global _tuned
    import sys

    if os.environ.get("HEADWATER_LOCAL_TUNING") == "0":
        return
    sys.setswitchinterval(min(sys.getswitchinterval(), LOCAL_SWITCH_INTERVAL_S))
    if _tuned:
        return
    _tuned = True
    _pipeline_state_commits()
    if "prism_disable_sdf_split" not in experiments:
        return
    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.worker import sdk_worker

    real = sdk_worker.SdkWorker.process_bundle_progress
    last = [0.0]

    def process_bundle_progress(self, request, instruction_id):
        import time

        now = time.monotonic()
        if now - last[0] >= LOCAL_PROGRESS_METRICS_EVERY_S:
            last[0] = now
            return real(self, request, instruction_id)
        return beam_fn_api_pb2.InstructionResponse(
            instruction_id=instruction_id,
            process_bundle_progress=beam_fn_api_pb2.ProcessBundleProgressResponse())

    process_bundle_progress.__wrapped__ = real
    sdk_worker.SdkWorker.process_bundle_progress = process_bundle_progress


def _pipeline_state_commits() -> None:
    """At the end of a bundle Beam commits each touched state cell in turn and waits for Prism's reply to
    each before sending the next: one blocking round trip per key (41 % of the bundle threads' time in the
    live job's profile once the reads were mirrored, state.mirror). Send every cell's requests first, then
    wait for them all. Prism answers a worker's state requests in order on one stream (worker.go ``State``),
    which Beam's own commit already relies on (a cell's clear and its new value are sent without waiting in
    between); cells of different keys are independent. Cell kinds other than bags and read-modify-write
    cells commit as Beam does."""
    from apache_beam.runners.worker import bundle_processor as bp

    real = bp.FnApiUserStateContext.commit

    def commit(self) -> None:
        waits = []
        for state in self._all_states.values():
            bag = state._underlying_bag_state if type(state) is bp.ReadModifyWriteRuntimeState else state
            if type(bag) is not bp.SynchronousBagRuntimeState:
                state.commit()
                continue
            last = None
            if bag._cleared:
                last = bag._state_handler.clear(bag._state_key)
            if bag._added_elements:
                last = bag._state_handler.extend(bag._state_key, bag._value_coder.get_impl(), bag._added_elements)
            if last is not None:
                waits.append(last)
        for w in waits:
            w.get()

    commit.__wrapped__ = real
    bp.FnApiUserStateContext.commit = commit
