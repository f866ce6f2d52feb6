"""ingest.bounded's FoldShards step (pure DoFn calls, no runner): duplicates dropped across shard groups, and one
partial per (partner, aggregate, key) per bundle whatever the number of shard groups the key's events are in."""
from __future__ import annotations

import os
import pickle
import random
import zlib

import pytest

from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from ingest.batch import metric_columns
from ingest.bounded import _FoldShardFn
from state import aggregate as A
from state import combine as C
from tests.state.test_combine import SPECS

SPEC = SPECS[1]  # lifetime, 1d, 7d, 30d over every metric function
COLS = metric_columns(SPEC)
T0 = 1_764_547_200_000_000
H = 3_600_000_000


def _events(n: int, users: int, seed: int = 3) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        values = {c: (rng.randint(1, 500) if "amount" in c or c in ("n", "v", "x") else f"{c}-{rng.randint(0, 5)}")
                  for c in COLS}
        out.append((f"ev-{i}", T0 + rng.randint(0, 40 * 24) * H, f"u{rng.randrange(users)}", values))
    return out


def _blob(entries: list) -> bytes:
    group = [(eid, t, ((0, key, tuple(values[c] for c in COLS)),), None) for eid, t, key, values in entries]
    return zlib.compress(pickle.dumps(("acme", group), protocol=pickle.HIGHEST_PROTOCOL), 1)


def _fold(shard_groups: list) -> tuple[list, list]:
    fn = _FoldShardFn({"acme": (SPEC,)}, keep_rows=False)
    fn.setup()
    fn.start_bundle()
    in_process = []
    for shard, blobs in shard_groups:
        in_process += list(fn.process((shard, blobs)))
    return in_process, list(fn.finish_bundle())


def test_one_partial_per_key_per_bundle_equal_to_the_fold_of_all_its_events():
    events = _events(400, users=7)
    dups = [events[5], events[77], events[300]]
    shards: dict[int, list] = {}
    for e in events + dups:
        shards.setdefault(zlib.crc32(e[0].encode()) % 16, []).append(e)
    groups = [(s, [_blob(es[:len(es) // 2]), _blob(es[len(es) // 2:])]) for s, es in sorted(shards.items())]
    assert len(groups) > 8  # every key's events are spread over many shard groups
    in_process, finished = _fold(groups)
    assert in_process == []  # no rows (keep_rows=False), no conflicts: partials come only at the bundle's end
    assert all(isinstance(wv, WindowedValue) and wv.windows == (GlobalWindow(),) for wv in finished)
    got = {wv.value[0]: wv.value[1] for wv in finished}
    assert sorted(got) == sorted({("acme", SPEC.name, e[2]) for e in events})  # one per key, not one per shard
    plan = A.plan_for(SPEC)
    for (_, _, key), part in got.items():
        mine = [(t, eid, v) for eid, t, k, v in events if k == key]  # each event once: the duplicates dropped
        want, _ = C.partial_of(mine, plan)
        assert C.final_rows(part, plan) == C.final_rows(want, plan), key


def test_a_new_bundle_starts_empty():
    events = _events(50, users=3)
    fn = _FoldShardFn({"acme": (SPEC,)}, keep_rows=False)
    fn.setup()
    fn.start_bundle()
    list(fn.process((0, [_blob(events)])))
    first = list(fn.finish_bundle())
    fn.start_bundle()
    list(fn.process((1, [_blob(events[:10])])))
    second = {wv.value[0]: wv.value[1] for wv in fn.finish_bundle()}
    plan = A.plan_for(SPEC)
    for (_, _, key), part in second.items():
        want, _ = C.partial_of([(t, eid, v) for eid, t, k, v in events[:10] if k == key], plan)
        assert C.final_rows(part, plan) == C.final_rows(want, plan)
    assert len(first) == 3


def _finals(finished: list) -> dict:
    plan = A.plan_for(SPEC)
    return {wv.value[0]: C.final_rows(wv.value[1], plan) for wv in finished}


def test_colliding_hashes_only_cost_a_slot_never_an_event(monkeypatch):
    """The first pass flags repeats by a hash of the event id; every hash colliding (the worst case) must give
    the same partials: the exact (partner, event id) decides what is a duplicate."""
    from ingest import shard_fold

    events = _events(300, users=5)
    groups = [(0, [_blob(events[:150] + [events[3]]), _blob(events[150:] + [events[200]])])]
    _, want = _fold(groups)
    monkeypatch.setattr(shard_fold, "event_hash", lambda partner, event_id: 0)
    _, got = _fold(groups)
    assert _finals(got) == _finals(want)
    plan = A.plan_for(SPEC)
    for (_, _, key), finals in _finals(got).items():
        mine, _ = C.partial_of([(t, eid, v) for eid, t, k, v in events if k == key], plan)
        assert finals == C.final_rows(mine, plan), key


def test_two_payloads_with_one_event_id_keep_the_same_copy_whatever_the_order():
    """A partner bug (not a redelivery): the copy kept is the one whose entry sorts first, in both orders."""
    events = _events(40, users=2)
    eid, t, key, values = events[7]
    other = (eid, t + H, key, {c: (v + 1 if isinstance(v, int) else v) for c, v in values.items()})
    forward = _finals(_fold([(0, [_blob(events), _blob([other])])])[1])
    backward = _finals(_fold([(0, [_blob([other]), _blob(list(reversed(events)))])])[1])
    assert forward == backward
    plan = A.plan_for(SPEC)
    one = [e for e in events if e[2] == key]
    kept = min(events[7], other, key=lambda e: bounded_order(e))
    want, _ = C.partial_of([(t_, e_, v_) for e_, t_, k_, v_ in one if e_ != eid] + [(kept[1], kept[0], kept[3])], plan)
    assert forward[("acme", SPEC.name, key)] == C.final_rows(want, plan)


def bounded_order(e: tuple) -> bytes:
    from ingest.bounded import _order

    eid, t, key, values = e
    return _order((eid, t, ((0, key, tuple(values[c] for c in COLS)),), None))


def test_spilled_blobs_fold_to_the_same_partials_and_are_removed_after_the_run(tmp_path):
    """On a local runner the dedup blobs go to files and only references cross the shuffle: the fold of the
    references equals the fold of the blobs, the references are small, and the run's end removes the files."""
    from ingest import bounded

    events = _events(500, users=9)
    blobs = [_blob(events[k:k + 60]) for k in range(0, 500, 60)] + [_blob(events[10:20])]  # 10 repeated events
    root = bounded.spill_dir()
    spill = bounded._Spill(root)
    # ProcessBatches spills plain pickles (not compressed); compressed blobs read back the same
    refs = [spill.put(k % 3, zlib.decompress(b) if k % 2 else b) for k, b in enumerate(blobs)]
    spill.flush()
    assert all(r.startswith(bounded._SPILL_REF) and len(r) < 200 for r in refs)
    files = os.listdir(root)
    assert len(files) == 3 and all(f.startswith("shard-") for f in files)  # one file per shard written
    _, want = _fold([(0, blobs)])
    _, got = _fold([(0, refs)])
    assert _finals(got) == _finals(want)
    assert len(_finals(got)) == 9
    spill.close()
    bounded.remove_spills()
    assert not os.path.exists(root)


def test_a_short_spill_file_fails_loudly(tmp_path):
    from ingest import bounded

    spill = bounded._Spill(str(tmp_path / "s"))
    ref = spill.put(0, _blob(_events(5, users=1)))
    spill.close()
    path = ref[len(bounded._SPILL_REF) + bounded._REF.size:].decode()
    with open(path, "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(RuntimeError, match="(?s)fold worker .* failed.*short"):  # spilled: the worker folds
        _fold([(0, [ref])])
    bounded.FOLD_IN_WORKER = False
    try:
        with pytest.raises(IOError, match="short"):  # in this process
            _fold([(0, [ref])])
    finally:
        bounded.FOLD_IN_WORKER = True


def test_spill_only_where_the_runner_shares_this_machine():
    from apache_beam.options.pipeline_options import PipelineOptions

    from ingest.bounded import _local_runner

    assert _local_runner(PipelineOptions([]))  # Beam's default: the DirectRunner (FnApiRunner) in this process
    assert _local_runner(PipelineOptions(["--runner=DirectRunner"]))
    assert not _local_runner(PipelineOptions(["--runner=DataflowRunner"]))
    assert not _local_runner(PipelineOptions(["--runner=PrismRunner"]))


def test_spill_directories_of_killed_processes_are_removed_by_the_next_run():
    """A SIGKILLed run cannot clean up: the next bounded job of any process removes what it left."""
    import subprocess
    import sys
    import tempfile

    from ingest import bounded

    code = ("import os, signal\nfrom ingest import bounded\nfrom ingest.bounded import _Spill\n"
            "s = _Spill(bounded.spill_dir()); s.put(0, b'x'); s.flush(); print(s._root, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -9, out.stderr
    left = out.stdout.strip()
    assert os.path.isdir(left) and os.path.dirname(left) == tempfile.gettempdir()
    mine = bounded.spill_dir()
    assert not os.path.exists(left)
    bounded._Spill(mine).put(0, b"y")
    bounded.remove_spills()
    assert not os.path.exists(mine)
