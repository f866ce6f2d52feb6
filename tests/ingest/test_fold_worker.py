"""FoldShards in a worker process (ingest.fold_worker): the same partials, duplicate counts and type-conflict
dead letters as the fold in the job's process; no process left behind, whether the bundle ends, fails, or the
worker is killed (a real SIGKILL)."""
from __future__ import annotations

import contextlib
import os
import signal
import time
import zlib

import pytest

from ingest import bounded, progress
from ingest.bounded import _FoldShardFn
from state import aggregate as A
from state import combine as C
from tests.ingest.test_bounded import COLS, SPEC, _blob, _events, _finals


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive: reaped by close(), so this only matters if it was not
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _spilled(groups: list) -> tuple[list, str]:
    """The shard groups' blobs written to spill files, as ProcessBatches does on a local runner: references."""
    root = bounded.spill_dir()
    spill = bounded._Spill(root)
    out = [(shard, [spill.put(shard, zlib.decompress(b)) for b in blobs]) for shard, blobs in groups]
    spill.close()
    return out, root


def _merged(finished: list) -> dict:
    """Final rows per key, the partials of a key folded by several workers merged first (as the combine does)."""
    plan = A.plan_for(SPEC)
    per_key: dict = {}
    for wv in finished:
        key, part = wv.value
        per_key[key] = C.merge_partials(per_key[key], part, plan) if key in per_key else part
    return {k: C.final_rows(p, plan) for k, p in per_key.items()}


@contextlib.contextmanager
def _folding(groups: list, keep_rows: bool = False):
    """A FoldShards DoFn in a bundle that has processed ``groups`` (spilled as on a local runner): (fn, refs, spill
    directory); the spill files are removed after."""
    refs, root = _spilled(groups)
    try:
        fn = _FoldShardFn({"acme": (SPEC,)}, keep_rows=keep_rows)
        fn.setup()
        fn.start_bundle()
        for g in refs:
            list(fn.process(g))
        yield fn, refs, root
    finally:
        bounded.remove_spills()


def _run(groups: list, in_worker: bool, workers: int = 1) -> tuple[list, list, int]:
    bounded.FOLD_IN_WORKER = in_worker
    before, bounded.FOLD_WORKERS = bounded.FOLD_WORKERS, workers
    try:
        fn = _FoldShardFn({"acme": (SPEC,)}, keep_rows=False, clock=lambda: 1_800_000_000.0)
        fn.setup()
        fn.start_bundle()
        progress.reset()
        dead = []
        for g in groups:
            dead += [o.value for o in fn.process(g)]
        fin = list(fn.finish_bundle())
        dead += [o.value.value for o in fin if hasattr(o, "tag")]
        partials = [o for o in fin if not hasattr(o, "tag")]
        fn.teardown()
        return partials, dead, progress.duplicates()
    finally:
        bounded.FOLD_IN_WORKER = True
        bounded.FOLD_WORKERS = before


def _conflicting(events: list) -> list:
    """Every 25th event carries text in a numeric metric's column: a type conflict (dead letter) per event."""
    num = next(c for c in COLS if "amount" in c or c in ("n", "v", "x"))
    return [(e, t, k, {**v, num: "not a number"}) if i % 25 == 0 else (e, t, k, v)
            for i, (e, t, k, v) in enumerate(events)]


@pytest.mark.parametrize("workers", [1, 3])
def test_the_workers_fold_exactly_what_the_job_process_folds(workers):
    """One worker, or several (each shard group folded whole by one of them, so a repeat is still seen as one):
    the same final values, duplicate counts and dead letters as the fold in the job's process."""
    events = _conflicting(_events(900, users=11))
    repeats = [events[3], events[250], events[251], events[700]]
    shards: dict[int, list] = {}
    for e in events + repeats:
        shards.setdefault(zlib.crc32(e[0].encode()) % 16, []).append(e)
    groups = [(s, [_blob(es[:len(es) // 2]), _blob(es[len(es) // 2:])]) for s, es in sorted(shards.items())]
    refs, root = _spilled(groups)
    try:
        here, dead_here, dups_here = _run(refs, in_worker=False)
        t0 = int(time.time() * 1e6)
        there, dead_there, dups_there = _run(refs, in_worker=True, workers=workers)
        t1 = int(time.time() * 1e6)
    finally:
        bounded.remove_spills()
    assert dups_here == dups_there == 4
    assert _merged(there) == _merged(here) == _finals(here) and len(_merged(there)) == 11
    if workers == 1:
        assert [wv.value[0] for wv in there] == [wv.value[0] for wv in here]  # same keys, same order
    else:  # 16 groups over 3 workers: a key's events are in every shard, so every worker has a partial of it
        assert len(there) == 3 * 11
    assert len({d.coords.rsplit("#", 1)[1] for d in dead_here}) == 36  # every conflicting event, once or more
    # the same dead letters; the worker stamps them with the real clock (the DoFn's test clock stays here)
    assert all(t0 <= d.processing_time_us <= t1 for d in dead_there)
    assert sorted(d._replace(processing_time_us=0) for d in dead_there) == \
        sorted(d._replace(processing_time_us=0) for d in dead_here)


def test_only_spilled_groups_go_to_a_worker_and_no_worker_outlives_its_bundle(monkeypatch):
    monkeypatch.setattr(bounded, "FOLD_WORKERS", 2)
    events = _events(200, users=4)
    with _folding([(0, [_blob(events)])]) as (fn, refs, root):
        pids = [w.pid for w in fn._workers]
        assert len(pids) == 2 and all(_alive(p) for p in pids)  # one got the group, the other nothing
        assert len(list(fn.finish_bundle())) == 4
        assert not fn._workers and not any(_alive(p) for p in pids)
        assert not [f for f in os.listdir(root) if f.startswith("partials-")]  # the result files are read and gone
        fn.start_bundle()  # in-memory blobs (Dataflow's case): folded here
        list(fn.process((0, [_blob(events)])))
        assert not fn._workers
        assert len(list(fn.finish_bundle())) == 4
        # rows kept (BigQuery): folded here too, the rows come back with the kept events
        keep = _FoldShardFn({"acme": (SPEC,)}, keep_rows=True)
        keep.setup()
        keep.start_bundle()
        list(keep.process(refs[0]))
        assert not keep._workers
        list(keep.finish_bundle())


def test_a_failed_bundle_leaves_no_worker_behind(monkeypatch):
    monkeypatch.setattr(bounded, "FOLD_WORKERS", 3)
    with _folding([(0, [_blob(_events(50, users=2))])]) as (fn, _, _):
        pids = [w.pid for w in fn._workers]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        fn.teardown()  # the runner tears the DoFn down after a failed bundle, without finish_bundle
        assert not any(_alive(p) for p in pids)


def test_a_killed_worker_fails_the_bundle_instead_of_hanging():
    with _folding([(0, [_blob(_events(50, users=2))])]) as (fn, refs, _):
        pid = fn._workers[0].pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=f"fold worker {pid}"):
            list(fn.process(refs[0]))  # its input is gone
            list(fn.finish_bundle())
        fn.teardown()
        assert not _alive(pid)


def test_ctrl_c_leaves_the_worker_to_the_job():
    """SIGINT reaches the whole process group on a terminal: the job decides (it stops or closes the worker),
    so the worker neither dies with a traceback nor loses the groups it holds."""
    with _folding([(0, [_blob(_events(200, users=4))])]) as (fn, _, _):
        pid = fn._workers[0].pid
        time.sleep(1.0)  # the worker has set up its handlers
        os.kill(pid, signal.SIGINT)
        assert len(list(fn.finish_bundle())) == 4
        assert not _alive(pid)


def test_partials_come_back_through_a_file_read_after_the_worker_is_gone(tmp_path, monkeypatch):
    """The partials travel through a file in chunks (never all of them in both processes): every pair, in the
    fold's order, the file removed once read; the worker has exited before the first pair is read."""
    from ingest import fold_worker

    monkeypatch.setattr(fold_worker, "CHUNK", 7)
    partials = {("acme", "a", f"u{i}"): [i, [i], {}] for i in range(50)}
    path = str(tmp_path / "partials.bin")
    fold_worker.write_partials(dict(partials), path)
    assert list(fold_worker.read_partials(path)) == list(partials.items())
    assert not os.path.exists(path)

    events = _events(300, users=9)
    with _folding([(0, [_blob(events[:150])]), (1, [_blob(events[150:])])]) as (fn, refs, root):
        pids = [w.pid for w in fn._workers]
        out = fn.finish_bundle()
        first = next(out)
        assert not any(_alive(p) for p in pids)
        rest = list(out)
        assert len([first, *rest]) == 9
        assert _finals([first, *rest]) == _finals(_run(refs, in_worker=False)[0])
        assert not [f for f in os.listdir(root) if f.startswith("partials-")]


def test_the_worker_runs_this_code_wherever_the_job_was_started(tmp_path, monkeypatch):
    """``python -m`` puts the working directory first on the path: a job started next to another ``ingest/``
    package must still fold with its own code (the worker runs from the code's root)."""
    impostor = tmp_path / "ingest"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("")
    (impostor / "fold_worker.py").write_text("import sys\nsys.exit(7)\n")
    monkeypatch.chdir(tmp_path)
    with _folding([(0, [_blob(_events(120, users=3))])]) as (fn, _, _):
        assert len(list(fn.finish_bundle())) == 3
        fn.teardown()
