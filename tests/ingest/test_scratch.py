"""ingest.scratch: a process's scratch in the temp directory; what a killed process left is removed by the next
process that makes scratch of the same kind (real processes, a real SIGKILL)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from ingest import scratch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _killed_leaving(kind: str) -> tuple[str, str]:
    """A process that makes a scratch directory and a scratch file of ``kind``, then is SIGKILLed."""
    code = ("import os, signal\nfrom ingest import scratch\n"
            f"d = scratch.new_dir({kind!r}); fd, f = scratch.new_file({kind!r}, '.jsonl'); os.write(fd, b'x')\n"
            "print(d, f, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=_ROOT)
    assert out.returncode == -9, out.stderr
    d, f = out.stdout.split()
    assert os.path.isdir(d) and os.path.isfile(f) and os.path.dirname(d) == tempfile.gettempdir()
    return d, f


def test_what_a_killed_process_left_is_removed_by_the_next_of_its_kind():
    d, f = _killed_leaving("recovery")
    other_d, other_f = _killed_leaving("backfill")
    mine = scratch.new_dir("recovery")  # removes the dead process's recovery scratch, nothing else
    try:
        assert not os.path.exists(d) and not os.path.exists(f)
        assert os.path.exists(other_d) and os.path.exists(other_f)  # another kind: left to its own kind
        fd, mine_f = scratch.new_file("backfill", ".jsonl")
        os.close(fd)
        assert not os.path.exists(other_d) and not os.path.exists(other_f)
        assert os.path.isdir(mine) and os.path.isfile(mine_f)  # a live process's scratch stays
        assert scratch.remove_stale("recovery") == 0 and os.path.isdir(mine)
        os.unlink(mine_f)
    finally:
        os.rmdir(mine)


def test_a_scratch_name_carries_its_process():
    path = scratch.new_dir("spill", create=False)
    assert not os.path.exists(path)
    assert os.path.basename(path).startswith(f"headwater-spill-{os.getpid()}-")
    assert scratch.alive(os.getpid())
