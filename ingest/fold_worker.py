"""FoldShards in a worker process: ``python -m ingest.fold_worker``, driven by ``FoldWorker``.

Why: a local bounded run is one Python process, and its time is the interpreter's lock's time (py-spy
``--gil``: the lock was held ~88 % of a 1M-event run's wall clock; the fold of the shard groups, pure Python,
was ~35 % of that, on one core, after the rows stage). Folded in a process of its own, the fold no longer
queues for the lock behind the rows writer (``sinks.duckdb_sink.deferred_writes``), which writes the rows
of the stage before meanwhile. Used only where the dedup blobs are spill references (the local runners:
the worker reads the same files); elsewhere (Dataflow) the fold runs in the DoFn as before.

Protocol (pickles, each framed by its length as a little-endian u64) on the worker's stdin/stdout:
``("init", specs)``, then any number of ``("group", [blob])``; ``("end", path)`` is answered with
``("result", partials, dups, conflicts, [DeadLetter])`` (or ``("error", traceback)``), after which the
worker starts afresh; end of input: it exits. Its stderr is the job's. With a ``path`` the partials are not in
the answer (``None`` there) but written to that file, as pickled lists of up to ``CHUNK`` ``(key, partial)``
pairs: the job ends the worker (its memory goes back to the system) before it reads them, a chunk at a time,
so the partials of every key are never in both processes at once (10M events, 200,000 keys: ~450 MB each).
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import traceback
from typing import Any, BinaryIO, Iterable, Iterator, Mapping

__all__ = ["FoldWorker", "main"]

_LEN = struct.Struct("<Q")
#: (key, partial) pairs per pickle in a result file.
CHUNK = 5000
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds the ingest/ package


def _send(fh: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_LEN.pack(len(data)))
    fh.write(data)
    fh.flush()


def _recv(fh: BinaryIO) -> Any:
    head = fh.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("fold worker: end of input")
    (n,) = _LEN.unpack(head)
    data = fh.read(n)
    if len(data) != n:
        raise EOFError(f"fold worker: message cut short ({len(data)} of {n} bytes)")
    return pickle.loads(data)


class FoldWorker:
    """One worker process folding shard groups (``ingest.shard_fold.ShardFolder``) for one bundle."""

    def __init__(self, specs: Mapping[str, tuple], result_path: "str | None" = None):
        self._result_path = result_path  # the partials come back through this file (see the module's doc)
        env = dict(os.environ)
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # its own process group: a Ctrl-C on the job's terminal goes to the job, which ends the worker itself;
        # run from this code's root (``-m`` puts the working directory first on the path: a job started where
        # another ``ingest/`` package lies would otherwise fold with that code)
        self._proc = subprocess.Popen([sys.executable, "-m", "ingest.fold_worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env, cwd=_ROOT, process_group=0)
        self.pid = self._proc.pid
        self._send(("init", dict(specs)))

    def _send(self, msg) -> None:
        try:
            _send(self._proc.stdin, msg)
        except (BrokenPipeError, OSError) as e:
            why = ""
            try:  # a worker that failed sent its traceback before it exited
                reply = _recv(self._proc.stdout)
                why = f":\n{reply[1]}" if reply[0] == "error" else ""
            except (EOFError, OSError):
                pass
            raise RuntimeError(f"fold worker {self.pid} is gone (exit code {self._proc.wait()}){why}") from e

    def group(self, blobs: list) -> None:
        """Queue a shard group (spill references). Returns when the worker's input pipe has taken it."""
        self._send(("group", blobs))

    def end(self) -> None:
        """Ask for the result of every queued group without waiting for it (several workers then finish
        together; ``result`` collects it)."""
        self._send(("end", self._result_path))

    def result(self) -> "tuple[Iterable, int, int, list]":
        """The answer to ``end``: ((key, partial) pairs, dups, conflicts, dead letters). With a result file the
        pairs are read from it lazily (``read_partials``): close the worker first."""
        try:
            msg = _recv(self._proc.stdout)
        except EOFError as e:
            raise RuntimeError(f"fold worker {self.pid} exited (code {self._proc.wait()}) before its result") from e
        if msg[0] == "error":
            raise RuntimeError(f"fold worker {self.pid} failed:\n{msg[1]}")
        pairs = msg[1].items() if msg[1] is not None else read_partials(self._result_path)
        return pairs, msg[2], msg[3], msg[4]

    def close(self) -> None:
        """End the worker (its input closed: it exits); killed if it has not within 10 s."""
        proc = self._proc
        try:
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def write_partials(partials: dict, path: str) -> None:
    """``partials``' (key, partial) pairs to ``path`` in pickled chunks of ``CHUNK``, emptying the dict as it goes."""
    keys = list(partials)  # in the fold's order (the order the job's process would emit them in)
    with open(path, "wb") as fh:
        for i in range(0, len(keys), CHUNK):
            pickle.dump([(k, partials.pop(k)) for k in keys[i:i + CHUNK]], fh, protocol=pickle.HIGHEST_PROTOCOL)


def read_partials(path: str) -> Iterator[tuple]:
    """The (key, partial) pairs ``write_partials`` wrote, a chunk in memory at a time; the file is removed after."""
    try:
        with open(path, "rb") as fh:
            while True:
                try:
                    chunk = pickle.load(fh)
                except EOFError:
                    return
                yield from chunk
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def main() -> int:
    from ingest.shard_fold import ShardFolder, SpillReader

    import signal

    # The job ends its worker itself (its input closes, or the job process is gone and the input ends): a
    # SIGINT that reaches the worker anyway (sent to it, or to its group) does not kill it mid-fold.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed goes to the job's stderr, not into the protocol
    try:
        kind, specs = _recv(stdin)
        assert kind == "init", kind
        folder = ShardFolder(specs, keep_rows=False)
        reader = SpillReader()
        dead: list = []
        while True:
            try:
                msg = _recv(stdin)
            except EOFError:
                return 0
            if msg[0] == "group":
                for kind, value in folder.group(msg[1], reader):
                    dead.append(value)  # keep_rows is off: only dead letters
            elif msg[0] == "end":
                partials, dups, conflicts = folder.take()
                path = msg[1] if len(msg) > 1 else None
                if path is not None:
                    write_partials(partials, path)
                    partials = None
                _send(stdout, ("result", partials, dups, conflicts, dead))
                dead = []
            else:
                raise ValueError(f"unknown message {msg[0]!r}")
    except Exception:  # noqa: BLE001 - reported to the job, which fails with it
        try:
            _send(stdout, ("error", traceback.format_exc()))
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
