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

__all__ = ["runner_options", "uses_native_pubsub", "commit_delay_seconds", "find_prism", "PrismNotFound",
           "NATIVE_PUBSUB_RUNNERS", "LOCAL_COMMIT_DELAY_S"]

#: Runners on which Beam's own ReadFromPubSub works (Dataflow: native; DirectRunner: _DirectReadFromPubSub).
NATIVE_PUBSUB_RUNNERS = frozenset({
    "DataflowRunner", "TestDataflowRunner", "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner",
})

#: Runners whose bundle finalization follows a *durable* commit of the bundle's output.
DURABLE_FINALIZATION_RUNNERS = frozenset({"DataflowRunner", "TestDataflowRunner"})
#: Elsewhere (Prism keeps everything in memory) offset commits / acks wait this long after
#: finalization, so a killed job replays what may not have reached the warehouse yet.
LOCAL_COMMIT_DELAY_S = 15.0

_ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = _ROOT / "deploy" / "local" / "install_prism.sh"


class PrismNotFound(RuntimeError):
    """No Prism binary: terminal until one is installed (the message says how)."""


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


def runner_options(contract_is_streaming: bool, user_argv: list[str], prism: Optional[str] = None) -> list[str]:
    """Beam argv for a job: the user's argv plus headwater's local defaults.

    Streaming contracts without ``--runner`` get ``--runner=PrismRunner``,
    ``--prism_location`` (``prism`` or :func:`find_prism`), ``--environment_type=LOOPBACK``
    (workers in this process, so PUBSUB_EMULATOR_HOST and credentials apply)
    and ``--streaming``. A user's ``--runner`` (DataflowRunner, ...) and any
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
            extra.append(f"--prism_location={location}")
        if _flag(argv, "environment_type") is None:
            extra.append("--environment_type=LOOPBACK")
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


def commit_delay_seconds(options: Any, env: Optional[dict[str, str]] = None) -> float:
    """How long a source waits after bundle finalization before committing offsets / acking.

    0 on Dataflow, where finalization follows the durable commit of the bundle's
    output. Prism keeps in-flight elements in memory only: a finalized source
    bundle may still be between stages when the job is killed, so committing at
    once would lose those records. There the commit waits ``LOCAL_COMMIT_DELAY_S``
    (override: HEADWATER_COMMIT_DELAY_S), which must exceed the source-to-warehouse
    latency; replays are absorbed by event-id dedup and idempotent row ids.
    """
    env = dict(os.environ) if env is None else env
    if _runner_name(options) in DURABLE_FINALIZATION_RUNNERS:
        return 0.0
    override = env.get("HEADWATER_COMMIT_DELAY_S")
    return float(override) if override else LOCAL_COMMIT_DELAY_S
