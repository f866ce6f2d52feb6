"""A fault-injecting HTTP proxy in front of the real BigQuery emulator (tests only).

Requests are forwarded to ``upstream`` unchanged (the ``Host`` header too, so resumable-upload session
URLs point back at the proxy). Faults, decided per request:

* a *poison* regex: any request whose body matches it is answered ``400`` (BigQuery refusing a request
  because of one bad row), every time;
* a *schedule*: requests whose method and path match ``scheduled`` consume the next action of a list
  (``action@PUT``: taken only by a PUT; other requests pass meanwhile):
  ``ok`` (forward), ``429`` / ``500`` / ``503`` (answered with Google's JSON error shape, not forwarded),
  ``timeout`` (nothing answered for ``stall_s``, then the connection is dropped), ``reset`` (connection
  reset before forwarding), ``reset_after`` (forwarded and committed upstream, then the response is cut
  off half-way with a TCP reset: the client cannot know the write happened).

Two BigQuery guarantees bqemulator 1.4 lacks (found while writing these tests), provided by the proxy so the
sink's exactly-once logic is exercised as it runs against the real service:

* ``dedup_insert_ids``: BigQuery de-duplicates ``insertAll`` rows by ``insertId`` (best effort, about a
  minute); the emulator does not, so the proxy drops rows whose insertId it has seen committed;
* ``job_ids``: BigQuery job ids are unique (a second ``jobs.insert`` with the same id is ``409 Already
  Exists``, and ``jobs.get`` finds the job by that id); the emulator ignores the client's id on resumable
  load uploads (it assigns ``bqemu_...``), so the proxy remembers completed uploads by the client's job id.

Every request and fault is recorded in ``log``.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

__all__ = ["FaultProxy"]

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, *, poison: Optional[bytes] = None, scheduled: str = r"$^",
                 schedule: tuple = (), stall_s: float = 3.0, dedup_insert_ids: bool = True, job_ids: bool = True):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port or 80)
        self.poison = re.compile(poison) if poison else None
        self.scheduled = re.compile(scheduled)
        self.schedule = list(schedule)
        self.stall_s = stall_s
        self.dedup = dedup_insert_ids
        self.job_ids = job_ids
        self._jobs: dict[str, dict] = {}  # client job id -> completed job resource
        self._uploads: dict[str, str] = {}  # resumable upload id -> client job id
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome)
        self._committed: dict[str, set] = {}
        self._lock = threading.RLock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                proxy._serve(self, body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # our own resets: not errors
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="FaultProxy", daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    # ------------------------------------------------------------------ faults
    def outcomes(self, what: str) -> int:
        return sum(1 for _, _, o in self.log if o == what)

    def _record(self, h, outcome: str) -> None:
        with self._lock:
            self.log.append((h.command, h.path, outcome))

    def _serve(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        if self.poison is not None and self.poison.search(body):
            self._record(h, "poison_400")
            return self._error(h, 400, "invalid", "Invalid value (injected: one poison row in the request)")
        action = "ok"
        if self.scheduled.search(f"{h.command} {h.path}"):
            with self._lock:  # "action@METHOD": only a request with that method takes it (others pass)
                if self.schedule and self.schedule[0].partition("@")[2] in ("", h.command):
                    action = self.schedule.pop(0).partition("@")[0]
        self._record(h, action)
        if action in ("429", "500", "503"):
            reason = {"429": "rateLimitExceeded", "500": "backendError", "503": "backendError"}[action]
            return self._error(h, int(action), reason, f"injected {action}")
        if action == "timeout":
            time.sleep(self.stall_s)
            return self._reset(h)
        if action == "reset":
            return self._reset(h)
        status, headers, data = self._forward(h, body)
        if action == "reset_after":  # the whole response, cut half-way (in the headers or the body), then RST
            raw = f"HTTP/1.1 {status} OK\r\n".encode() + b"".join(
                f"{k}: {v}\r\n".encode() for k, v in headers if k.lower() not in _HOP and k.lower() != "content-length")
            raw += f"Content-Length: {len(data)}\r\n\r\n".encode() + data
            h.wfile.write(raw[: len(raw) // 2])
            h.wfile.flush()
            return self._reset(h)
        h.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP and k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list, bytes]:
        if self.job_ids:
            done = self._job_ids(h, body)
            if done is not None:
                return done
        status, headers, data = self._forward_rows(h, body)
        if self.job_ids and status == 200 and h.path.startswith("/upload/"):
            self._remember_job(h, body, headers, data)
        return status, headers, data

    def _job_ids(self, h: BaseHTTPRequestHandler, body: bytes) -> Optional[tuple[int, list, bytes]]:
        """A duplicate job id -> 409; jobs.get of a completed upload by the client's id -> that job."""
        js = [("Content-Type", "application/json")]
        if h.command == "POST" and "uploadType=resumable" in h.path and "upload_id=" not in h.path:
            jid = (json.loads(body or b"{}").get("jobReference") or {}).get("jobId")
            with self._lock:
                if jid in self._jobs:
                    self._record(h, "job_exists_409")
                    return 409, js, json.dumps({"error": {"code": 409, "message": f"Already Exists: Job {jid}",
                                                          "errors": [{"reason": "duplicate"}]}}).encode()
        m = re.match(r"/bigquery/v2/projects/[^/]+/jobs/([^/?]+)", h.path)
        if h.command == "GET" and m:
            with self._lock:
                job = self._jobs.get(m.group(1))
            if job is not None:
                return 200, js, json.dumps(job).encode()
        return None

    def _remember_job(self, h: BaseHTTPRequestHandler, body: bytes, headers: list, data: bytes) -> None:
        if "upload_id=" not in h.path:  # initiation: remember which job id this upload session is for
            jid = (json.loads(body or b"{}").get("jobReference") or {}).get("jobId")
            loc = dict((k.lower(), v) for k, v in headers).get("location", "")
            up = re.search(r"upload_id=([^&]+)", loc)
            if jid and up:
                with self._lock:
                    self._uploads[up.group(1)] = jid
            return
        up = re.search(r"upload_id=([^&]+)", h.path)
        with self._lock:
            jid = self._uploads.get(up.group(1)) if up else None
        if jid:
            job = json.loads(data)
            job["jobReference"] = {**job.get("jobReference", {}), "jobId": jid}
            job["id"] = f"{job['jobReference'].get('projectId', '')}:{jid}"
            with self._lock:
                self._jobs[jid] = job

    def _forward_rows(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list, bytes]:
        m = re.search(r"/tables/([^/]+)/insertAll", h.path)
        committed_now: list = []
        if m and self.dedup and h.command == "POST":
            req = json.loads(body)
            with self._lock:
                seen = self._committed.setdefault(m.group(1), set())
                fresh = [r for r in req.get("rows", []) if r.get("insertId") not in seen]
            if len(fresh) != len(req.get("rows", [])):
                self._record(h, f"dedup_{len(req['rows']) - len(fresh)}")
                if not fresh:
                    return 200, [("Content-Type", "application/json")], \
                        b'{"kind": "bigquery#tableDataInsertAllResponse", "insertErrors": []}'
                body = json.dumps({**req, "rows": fresh}).encode()
            committed_now = [r.get("insertId") for r in fresh]
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP and k.lower() != "content-length"}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if m and resp.status == 200 and committed_now:
                with self._lock:
                    self._committed[m.group(1)].update(committed_now)
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, code: int, reason: str, message: str) -> None:
        data = json.dumps({"error": {"code": code, "message": message,
                                     "errors": [{"reason": reason, "message": message}]}}).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        """Close with RST (SO_LINGER 0): the client sees a connection reset, not a clean end."""
        try:
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        h.close_connection = True
        try:
            h.connection.close()
        except OSError:
            pass
