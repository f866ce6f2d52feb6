"""Scratch files and directories of this process in the temp directory, named ``headwater-<kind>-<pid>-...``.

Each is removed when its run ends (``remove_mine(kind)``; whatever is left, at the process's exit); a process
that was killed could not, so making a new one of a kind first removes those of that kind whose process no longer
runs (the pid in the name). Kinds in use: ``spill``
(the bounded job's dedup blobs and deferred row buffers), ``recovery`` (a local streaming job's start-up
snapshots of its state), ``backfill`` (the chunk list of a backfill run).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

__all__ = ["new_dir", "new_file", "remove_mine", "remove_stale", "alive"]

_MINE: dict = {}  # kind -> paths of this process's scratch of that kind, not removed yet


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(kind: str) -> int:
    """Remove the ``kind`` scratch of processes that no longer run; returns how many were removed."""
    root, prefix, n = tempfile.gettempdir(), f"headwater-{kind}-", 0
    for name in os.listdir(root):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            _remove(os.path.join(root, name))
            n += 1
    return n


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_mine(kind: "str | None" = None) -> None:
    """Remove this process's ``kind`` scratch (every kind: None); what is already gone is skipped."""
    for k in [kind] if kind is not None else list(_MINE):
        paths = _MINE.get(k, [])
        while paths:
            _remove(paths.pop())


atexit.register(remove_mine)


def new_dir(kind: str, create: bool = True) -> str:
    """A new directory path for ``kind`` scratch of this process (made unless ``create`` is False)."""
    remove_stale(kind)
    path = os.path.join(tempfile.gettempdir(), f"headwater-{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    if create:
        os.makedirs(path)
    _MINE.setdefault(kind, []).append(path)
    return path


def new_file(kind: str, suffix: str = "") -> "tuple[int, str]":
    """A new file for ``kind`` scratch of this process: ``(fd, path)`` as ``tempfile.mkstemp`` gives them."""
    remove_stale(kind)
    fd, path = tempfile.mkstemp(prefix=f"headwater-{kind}-{os.getpid()}-", suffix=suffix)
    _MINE.setdefault(kind, []).append(path)
    return fd, path
