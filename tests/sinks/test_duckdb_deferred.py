"""Deferred rows writes of a bounded run in this process (sinks.duckdb_sink.deferred_writes): a rows bundle
ends without waiting for its writes, what is queued beyond the memory budget waits in spill files, the run's
end waits for all of it and raises a write that failed. Real DuckDB files; the writer is held back with the
file's own in-process write lock (what another writer of this process holds while it writes)."""
from __future__ import annotations

import glob
import os
import tempfile
import threading

import pytest

from flatten import live
from flatten.options import SchemaMode
from flatten.records import TableRow
from ingest.bounded import bounded_settings, defer_rows_writes
from sinks import duckdb_sink, duckdb_store
from sinks.spec import TableSpec, WarehouseSpec
from tests.ingest.test_pipeline import contract_for
from tests.sinks.test_duckdb_bounded_writer import _counts_in_other_process, _rows


def _writer(path, kind: str = "rows") -> duckdb_sink._BufferedWriteFn:
    return duckdb_sink._BufferedWriteFn(kind, WarehouseSpec(kind="duckdb", path=str(path)),
                                        {"acme": TableSpec(name="t")}, {"acme": SchemaMode.EVOLVE}, hold=True)


def _spills() -> set:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), f"headwater-spill-{os.getpid()}-*")))


def test_a_rows_bundle_ends_before_its_writes_and_the_run_end_waits_for_them(tmp_path):
    path = tmp_path / "w.duckdb"
    live.reset()
    lock = duckdb_store._lock_for(str(path))
    with duckdb_sink.deferred_writes():
        fn = _writer(path)
        fn.setup()
        assert fn._flush_rows == duckdb_sink.DEFERRED_FLUSH_ROWS  # not the held writer's larger writes
        fn.start_bundle()
        with lock:  # the writer thread cannot write while this is held
            for k in range(0, 300, 30):
                fn.process(_rows(30, start=k))
            fn.finish_bundle()  # returns at once: nothing is stored yet
            assert len(fn._queue) >= 1 and not any(f.done() for f in fn._queue)
        fn.teardown()  # the FnApiRunner's teardown: returns, the run's end drains
    assert not fn._queue and fn._wh._con is None  # drained, the held connection closed (checkpointed)
    assert _counts_in_other_process(path) == {"t": (300, 300), "t__accounts": (600, 600)}
    assert live.value("rows_written") == 900  # counted when they completed, after the bundle
    live.reset()


def test_outside_the_run_context_a_rows_bundle_waits_for_its_writes(tmp_path):
    path = tmp_path / "w.duckdb"
    lock = duckdb_store._lock_for(str(path))
    fn = _writer(path)
    fn.setup()
    fn.start_bundle()
    fn.process(_rows(30))
    done = threading.Event()
    with lock:
        t = threading.Thread(target=lambda: (fn.finish_bundle(), done.set()))
        t.start()
        assert not done.wait(0.5)  # the bundle waits for the write the lock holds back
    t.join(30)
    assert done.is_set()
    fn.teardown()
    assert _counts_in_other_process(path) == {"t": (30, 30), "t__accounts": (60, 60)}


def test_buffers_beyond_the_memory_budget_wait_in_spill_files_and_are_written_once(tmp_path, monkeypatch):
    monkeypatch.setattr(duckdb_sink, "DEFER_MEMORY_BYTES", 20_000)  # ~ one 30-event buffer
    monkeypatch.setattr(duckdb_sink, "DEFERRED_FLUSH_ROWS", 90)  # a write per 30 events (3 rows each)
    path = tmp_path / "w.duckdb"
    lock = duckdb_store._lock_for(str(path))
    before = _spills()
    with duckdb_sink.deferred_writes() as d:
        fn = _writer(path)
        fn.setup()
        fn.start_bundle()
        with lock:
            for k in range(0, 600, 30):
                fn.process(_rows(30, start=k) + _rows(3, start=k))  # 3 events twice: stored once
            fn.finish_bundle()
            files = _spills() - before
            assert len(files) == 1  # this run's spill directory
            queued = glob.glob(os.path.join(files.pop(), "rows-*.pickle"))
            assert d.spilled == len(queued) >= 15  # all but the in-memory buffer(s) wait on disk
            assert fn._queued <= 20_000 + 33 * 3 * 1000  # the in-memory budget (+ the first buffer, always kept)
    assert _spills() == before  # removed at the run's end
    assert _counts_in_other_process(path) == {"t": (600, 600), "t__accounts": (1200, 1200)}


def test_a_spilled_buffer_comes_back_as_the_same_rows(tmp_path):
    d = duckdb_sink._Deferral()
    rows = _rows(20)
    try:
        back = d.unspill(d.spill(rows))
    finally:
        d.close()
    assert back == rows and all(type(r) is TableRow for r in back)


def _bad_rows() -> list:
    """Rows of a partner the warehouse has no table spec for: the write fails (KeyError) in the writer thread."""
    return [r._replace(partner="nobody", table="x" + r.table) for r in _rows(5, start=1000)]


def test_a_write_that_fails_after_the_last_bundle_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(duckdb_sink, "DEFERRED_FLUSH_ROWS", 15)  # a write per 5 events
    path = tmp_path / "w.duckdb"
    lock = duckdb_store._lock_for(str(path))
    with pytest.raises(RuntimeError, match=r"1 deferred DuckDB write\(s\) failed.*KeyError.*nobody"):
        with duckdb_sink.deferred_writes():
            fn = _writer(path)
            fn.setup()
            fn.start_bundle()
            with lock:  # both writes wait: the failure is found after the bundle, by the run's end
                fn.process(_rows(5))
                fn.process(_bad_rows())
                fn.finish_bundle()
            fn.teardown()
    assert _counts_in_other_process(path) == {"t": (5, 5), "t__accounts": (10, 10)}  # the good write is stored


def test_a_failed_write_fails_the_next_flush_in_its_bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(duckdb_sink, "DEFERRED_FLUSH_ROWS", 15)  # a write per 5 events
    path = tmp_path / "w.duckdb"
    lock = duckdb_store._lock_for(str(path))
    with pytest.raises(KeyError, match="nobody"):
        with duckdb_sink.deferred_writes():
            fn = _writer(path)
            fn.setup()
            fn.start_bundle()
            with lock:
                fn.process(_bad_rows())
                fn.finish_bundle()  # returns: the write waits for the lock
            assert isinstance(fn._queue[0].exception(timeout=30), KeyError)
            fn.start_bundle()
            fn.process(_rows(5))  # a flush: re-raises the failed write here, in the bundle
            pytest.fail("the failed write was not re-raised")
    con = duckdb_store.open_readonly(str(path))
    try:  # the failed write stored nothing, and the flush that met its failure queued nothing
        assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 't'").fetchone() == (0,)
    finally:
        con.close()


def test_a_failed_run_abandons_the_writes_that_have_not_started(tmp_path, monkeypatch):
    """A run that fails or is stopped (Ctrl-C) waits only for the write in progress: rows are idempotent,
    a rerun writes the rest; it does not sit through the whole queue."""
    monkeypatch.setattr(duckdb_sink, "DEFERRED_FLUSH_ROWS", 15)  # a write per 5 events
    path = tmp_path / "w.duckdb"
    lock = duckdb_store._lock_for(str(path))
    lock.acquire()
    try:
        with pytest.raises(InterruptedError):
            with duckdb_sink.deferred_writes():
                fn = _writer(path)
                fn.setup()
                fn.start_bundle()
                for k in range(0, 20, 5):
                    fn.process(_rows(5, start=k))
                first = fn._queue[0]
                for _ in range(300):
                    if first.running():
                        break
                    threading.Event().wait(0.01)
                assert first.running() and len(fn._queue) == 4
                threading.Timer(0.5, lock.release).start()  # the write in progress goes on after 0.5 s
                raise InterruptedError("the run was stopped")
    finally:
        if lock.locked():
            lock.release()
    assert first.done() and not first.cancelled()
    assert _counts_in_other_process(path) == {"t": (5, 5), "t__accounts": (10, 10)}  # the first write only


def test_bounded_settings_drain_the_run_and_remove_its_spills(tmp_path, monkeypatch):
    monkeypatch.setattr(duckdb_sink, "DEFER_MEMORY_BYTES", 1)
    monkeypatch.setattr(duckdb_sink, "DEFERRED_FLUSH_ROWS", 30)
    path = tmp_path / "w.duckdb"
    before = _spills()
    with bounded_settings(defer_writes=True):
        fn = _writer(path)
        fn.setup()
        fn.start_bundle()
        for k in range(0, 100, 10):
            fn.process(_rows(10, start=k))
        fn.finish_bundle()
    assert _spills() == before
    assert _counts_in_other_process(path) == {"t": (100, 100), "t__accounts": (200, 200)}


def test_aggregates_and_dead_letters_are_never_deferred(tmp_path):
    with duckdb_sink.deferred_writes() as d:
        fns = [_writer(tmp_path / "w.duckdb", kind) for kind in ("aggregates", "dead_letters")]
        for fn in fns:
            fn.setup()
        assert all(fn._defer is None for fn in fns) and d.writers == []
        for fn in fns:
            fn.teardown()


def test_only_a_run_with_aggregates_defers_its_rows_writes(tmp_path):
    """Without aggregates nothing follows the rows stage, so deferring would only add the spill files' cost."""
    assert defer_rows_writes(contract_for(tmp_path, aggregates=True))
    assert not defer_rows_writes(contract_for(tmp_path, aggregates=False))
    with bounded_settings():
        fn = _writer(tmp_path / "w.duckdb")
        fn.setup()
        assert fn._defer is None
        fn.teardown()
    with bounded_settings(defer_writes=True):
        fn = _writer(tmp_path / "w.duckdb")
        fn.setup()
        assert fn._defer is not None
    assert fn._wh._con is None  # drained and closed when the run ended
