import os

import pytest

# Tests never read a developer's key; masking uses a fixed test key unless a test says otherwise.
os.environ.setdefault("HEADWATER_MASK_KEY", "test-key-0123456789abcdef0123456789abcdef")


@pytest.fixture(autouse=True)
def _local_state_cache():
    """Tests run the FnApiRunner in-process: apply headwater's local state-cache default like `run()` does."""
    from ingest.pipeline import _configure_local_state_cache

    _configure_local_state_cache([])
    yield


# -- no runner process outlives the test session ----------------------------------------------------
# Every process this session starts (jobs, Prism's supervisor, Prism) inherits this marker, so the
# check below finds exactly ours in the process table, whoever else runs Prism on the machine.
SESSION_MARKER = "HEADWATER_TEST_SESSION"
os.environ.setdefault(SESSION_MARKER, os.urandom(8).hex())


def runner_processes(marker_value: str, marker: str = SESSION_MARKER) -> list[tuple[int, str]]:
    """(pid, command line) of live Prism processes (or their supervisors) whose environment holds
    ``marker=marker_value``: read from /proc, not from what the code believes it stopped."""
    found = []
    want = f"{marker}={marker_value}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            if "prism" not in cmd:
                continue
            with open(f"/proc/{pid}/stat", "rb") as fh:
                if fh.read().split(b") ", 1)[1][:1] == b"Z":
                    continue  # a zombie holds nothing; its parent reaps it
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if want in fh.read().split(b"\0"):
                    found.append((int(pid), cmd.strip()))
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    return found


def wait_no_runner(marker_value: str, timeout_s: float = 20.0, marker: str = SESSION_MARKER) -> list:
    import time

    deadline = time.monotonic() + timeout_s
    left = runner_processes(marker_value, marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = runner_processes(marker_value, marker)
    return left


def _beam_temp_dirs() -> set:
    import glob
    import tempfile

    return set(glob.glob(os.path.join(tempfile.gettempdir(), "beam-pipeline-temp*")))


_BEAM_TEMP_BEFORE: set = set()


def pytest_sessionstart(session):
    _BEAM_TEMP_BEFORE.update(_beam_temp_dirs())


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if a Prism process it started is still running (checked in the process table).
    Also remove the empty temp directories of the pipelines tests built without running them (Beam makes one
    per Pipeline and removes it only in ``run()``)."""
    for path in _beam_temp_dirs() - _BEAM_TEMP_BEFORE:
        try:
            os.rmdir(path)  # empty ones only: a running job's directory is not ours to take
        except OSError:
            pass
    try:
        from ingest.runner import stop_local_runners

        stop_local_runners()  # the in-process jobs' runner (Beam keeps one Prism per process until exit)
    except Exception:  # noqa: BLE001 - the check below is what matters
        pass
    left = wait_no_runner(os.environ[SESSION_MARKER])
    if left:
        import sys

        sys.stderr.write(f"\nheadwater: {len(left)} runner process(es) started by this test session are still "
                         f"running: {left}\n")
        session.exitstatus = 1


def plant_metric_drift(con, partner: str, aggregate: str, key: str, metric: str, delta: int,
                       window: str = "lifetime") -> dict:
    """Add ``delta`` to ``metric`` in the latest aggregate row of (partner, aggregate, key, window) of a
    DuckDB warehouse (a drift for `headwater verify` to find); returns the metrics as planted."""
    import orjson

    where = "partner = ? AND aggregate = ? AND key = ? AND \"window\" = ?"
    metrics, version = con.execute(f"SELECT metrics, version FROM aggregates WHERE {where} "
                                   "ORDER BY version DESC LIMIT 1", [partner, aggregate, key, window]).fetchone()
    before = orjson.loads(metrics)
    changed = {**before, metric: before[metric] + delta}
    con.execute(f"UPDATE aggregates SET metrics = ? WHERE {where} AND version = ?",
                [orjson.dumps(changed).decode(), partner, aggregate, key, window, version])
    return changed


def plant_unseen_event(con, table: str, user: str) -> None:
    """Copy the earliest event row of ``user`` in ``table`` under a new id: an event no aggregate saw."""
    con.execute(f"INSERT INTO {table} SELECT * REPLACE ('planted' AS _row_id, 'planted' AS _event_id) "
                f"FROM {table} WHERE _user_id = ? ORDER BY _event_time LIMIT 1", [user])
