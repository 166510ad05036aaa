"""In-memory fake of the jobsyncd server API (CONTRACT section 7) with programmable faults,
plus a TCP proxy that injects network faults.

This is a helper module for tests, not a test file.  Standard library only.

    with FaultServer(token=None) as srv:
        srv.url                      # "http://127.0.0.1:PORT"
        srv.listing_limit = 2        # force small pages
        h = srv.add_fault("POST", r"/api/v1/jobs", status=503, headers={"Retry-After": "2"})
        ...
        assert h.hits == 1
        srv.snapshot()               # list of job dicts (copies)

    with FaultProxy("127.0.0.1", srv.port) as px:
        px.url                       # point the client here
        px.closed = True             # connection refused (existing connections dropped)
        px.reopen()                  # listening again on the same port

Fault paths are regular expressions matched with ``re.fullmatch`` against the request path without
the query string, e.g. ``r"/api/v1/jobs"`` (the collection only) or ``r"/api/v1/jobs/.+"``
(any single job).  Faults are checked before the token; a fault that lets the request through
(delay, drop_after_store) still goes through the token check.  ``srv.jobs`` and ``srv.requests``
return copies taken under the lock; change server state only with ``server_create``,
``server_edit`` and ``server_delete`` (each changes the collection ETag).
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import itertools
import json
import re
import select
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["FaultServer", "FaultProxy", "Fault", "parse_multipart", "API_PREFIX"]

API_PREFIX = "/api/v1"
JOBS_PATH = API_PREFIX + "/jobs"
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
MAX_JSON_BYTES = 1024 * 1024
MAX_AUDIO_BYTES = 64 * 1024 * 1024
MAX_WAIT = 30.0  # upper bound for delay / delay_event waits
MAX_STALL = 60.0  # upper bound for a stalled answer
JOIN_TIMEOUT = 5.0

_PRIMARY_ACTIONS = (
    "status",
    "drop_after_store",
    "drop_before",
    "garbage",
    "content_type",
    "huge",
    "stall",
    "empty_listing",
    "fail_page",
)
_ALL_ACTIONS = set(_PRIMARY_ACTIONS) | {"delay", "delay_event", "body", "headers"}
_LISTING_ONLY = ("empty_listing", "fail_page")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_uuid(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class _Headers(dict):
    """A plain dict of request headers whose lookups ignore case."""

    def _key(self, key):
        if isinstance(key, str):
            low = key.lower()
            for k in dict.keys(self):
                if k.lower() == low:
                    return k
        return key

    def __getitem__(self, key):
        return dict.__getitem__(self, self._key(key))

    def __contains__(self, key):
        return dict.__contains__(self, self._key(key))

    def get(self, key, default=None):
        k = self._key(key)
        return dict.get(self, k, default)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# --------------------------------------------------------------------------------------------
# multipart/form-data


def _parse_header_params(value: str) -> tuple[str, dict]:
    """'form-data; name="a"; filename="b.wav"' -> ('form-data', {'name': 'a', 'filename': 'b.wav'})"""
    parts = []
    cur, quoted, esc = [], False, False
    for ch in value:
        if esc:
            cur.append(ch)
            esc = False
        elif quoted and ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == ";" and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    main = parts[0].strip().lower()
    params = {}
    for p in parts[1:]:
        if "=" not in p:
            continue
        k, v = p.split("=", 1)
        k, v = k.strip().lower(), v.strip()
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = v[1:-1]
        params[k] = v
    return main, params


def parse_multipart(body: bytes, content_type: str) -> dict:
    """Parse a multipart/form-data body.

    Returns {name: {"data": bytes, "filename": str|None, "content_type": str|None}} (the last
    part wins for a repeated name).  Raises ValueError when malformed.
    """
    _, params = _parse_header_params(content_type)
    boundary = params.get("boundary")
    if not boundary:
        raise ValueError("multipart without boundary")
    delim = b"--" + boundary.encode("latin-1")
    pos = body.find(delim)
    if pos < 0:
        raise ValueError("multipart boundary not found")
    fields: dict = {}
    pos += len(delim)
    while True:
        if body[pos : pos + 2] == b"--":
            return fields  # closing delimiter
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("truncated multipart body")
        pos = eol + 2
        hend = body.find(b"\r\n\r\n", pos)
        if hend < 0:
            # a part without headers is allowed only as empty headers block
            if body[pos : pos + 2] == b"\r\n":
                hend = pos - 2
            else:
                raise ValueError("truncated multipart part headers")
        raw_headers = body[pos:hend].decode("latin-1") if hend > pos else ""
        data_start = hend + 4
        nxt = body.find(b"\r\n" + delim, data_start)
        if nxt < 0:
            raise ValueError("unterminated multipart part")
        data = body[data_start:nxt]
        name = filename = ctype = None
        for line in raw_headers.split("\r\n"):
            if ":" not in line:
                continue
            hk, hv = line.split(":", 1)
            hk = hk.strip().lower()
            if hk == "content-disposition":
                _, dparams = _parse_header_params(hv)
                name = dparams.get("name")
                filename = dparams.get("filename")
            elif hk == "content-type":
                ctype = hv.strip()
        if name is None:
            raise ValueError("multipart part without a name")
        fields[name] = {"data": data, "filename": filename, "content_type": ctype}
        pos = nxt + 2 + len(delim)


# --------------------------------------------------------------------------------------------
# faults


class Fault:
    """A programmed fault; ``hits`` counts how many requests it has taken."""

    def __init__(self, method, path, times, action):
        unknown = set(action) - _ALL_ACTIONS
        if unknown:
            raise TypeError(f"unknown fault action(s): {sorted(unknown)}")
        primaries = [a for a in _PRIMARY_ACTIONS if action.get(a) not in (None, False)]
        # status may refine garbage / content_type / fail_page answers
        if (
            "status" in primaries
            and len(primaries) > 1
            and all(p in ("status", "garbage", "content_type", "fail_page") for p in primaries)
        ):
            primaries.remove("status")
        timing = action.get("delay") is not None or action.get("delay_event") is not None
        if len(primaries) > 1 or (not primaries and not timing):
            raise TypeError(
                "a fault takes exactly one action (delay/delay_event may be combined with one)"
            )
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        self.method = method.upper() if method else None
        if path is None and any(action.get(a) for a in _LISTING_ONLY):
            path = re.escape(JOBS_PATH)
            if self.method is None:
                self.method = "GET"
        self.path = path
        self._rx = re.compile(path) if path is not None else None
        self.times = times
        self.action = dict(action)
        self.hits = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    @property
    def remaining(self):
        return None if self.times is None else max(0, self.times - self.hits)

    def matches(self, method: str, path: str, page: int | None) -> bool:
        if self.exhausted:
            return False
        if self.method is not None and self.method != method:
            return False
        if self._rx is not None and not self._rx.fullmatch(path):
            return False
        if self.action.get("fail_page") is not None and (
            method != "GET" or path != JOBS_PATH or page != int(self.action["fail_page"])
        ):
            return False
        return not (self.action.get("empty_listing") and (method != "GET" or path != JOBS_PATH))

    def __repr__(self):
        return f"Fault({self.method} {self.path} times={self.times} hits={self.hits} {self.action})"


# --------------------------------------------------------------------------------------------
# the HTTP server


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, addr, handler, owner: FaultServer):
        self.owner = owner
        super().__init__(addr, handler)

    def get_request(self):
        conn, addr = super().get_request()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return conn, addr

    def process_request(self, request, client_address):
        owner = self.owner
        if owner._closing.is_set():
            self.shutdown_request(request)
            return
        t = threading.Thread(
            target=self._run_conn,
            args=(request, client_address),
            name="faultserver-conn",
            daemon=True,
        )
        with owner._lock:
            owner._conns.add(request)
            owner._threads.add(t)
        t.start()

    def _run_conn(self, request, client_address):
        owner = self.owner
        try:
            self.finish_request(request, client_address)
        except Exception as e:  # noqa: BLE001 - faults make connection errors routine
            owner._note_error(e)
        finally:
            try:
                self.shutdown_request(request)
            except OSError:
                pass
            with owner._lock:
                owner._conns.discard(request)
                owner._threads.discard(threading.current_thread())

    def handle_error(self, request, client_address):  # pragma: no cover - quiet
        pass


class _DropConnection(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FaultServer/1.0"
    timeout = 60  # idle keep-alive connections end eventually
    server: _HTTPServer

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PATCH(self):
        self._handle()

    def do_DELETE(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def do_OPTIONS(self):
        # No resumable uploads here: OPTIONS /api/v1/uploads answers 404 like any unknown path
        # (contract 7: 404 or 405 means not offered); a fault may answer otherwise.
        self._handle()

    # -- plumbing ------------------------------------------------------------------------------

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_body(self) -> bytes:
        if getattr(self, "_body", None) is not None:
            return self._body
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            total = 0
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise _DropConnection()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    break
                total += size
                if total > MAX_AUDIO_BYTES + MAX_JSON_BYTES:
                    raise _HTTPError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
            body = b"".join(chunks)
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise _HTTPError(400, "bad Content-Length") from None
            if length > MAX_AUDIO_BYTES + MAX_JSON_BYTES:
                self.close_connection = True
                raise _HTTPError(413, "request body too large")
            body = self.rfile.read(length) if length > 0 else b""
            if len(body) < length:
                raise _DropConnection()
        self._body = body
        return body

    def _finish_body(self):
        """Consume an unread request body so the keep-alive connection stays in sync."""
        if getattr(self, "_body", None) is not None:
            return
        try:
            self._read_body()
        except (_HTTPError, _DropConnection, OSError, ValueError):
            self.close_connection = True
            self._body = b""

    def _send(self, status: int, body=None, headers: dict | None = None, content_type=None):
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            payload = json.dumps(body).encode()
            content_type = content_type or "application/json"
        elif isinstance(body, str):
            payload = body.encode()
        elif body is None:
            payload = b""
        else:
            payload = bytes(body)
        self._finish_body()
        no_body = status in (204, 304) or 100 <= status < 200
        if no_body:
            payload = b""
        self.send_response(status)
        lower = {k.lower() for k in headers}
        if not no_body and content_type and "content-type" not in lower:
            self.send_header("Content-Type", content_type)
        for k, v in headers.items():
            if k.lower() == "content-length":
                continue
            self.send_header(k, str(v))
        if not no_body:
            self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    # -- dispatch ------------------------------------------------------------------------------

    def _handle(self):
        self._body = None
        owner: FaultServer = self.server.owner
        split = urlsplit(self.path)
        path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        method = self.command.upper()
        owner._log_request(method, self.path, self.headers)
        page = owner._page_of(query) if path == JOBS_PATH and method == "GET" else None
        fault = owner._take_fault(method, path, page)
        try:
            if fault is None:
                self._respond(self._api(method, path, query))
            else:
                self._apply_fault(fault, method, path, query)
        except _DropConnection:
            self._drop()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    def _api(self, method, path, query, listing_override=None):
        """Run the request against the store; returns (status, body, headers, content_type)."""
        owner: FaultServer = self.server.owner
        try:
            owner._check_auth(self.headers)
            return owner._route(self, method, path, query, listing_override)
        except _HTTPError as e:
            return (e.status, {"error": e.message}, e.headers, None)

    def _respond(self, resp):
        status, body, headers, ctype = resp
        self._send(status, body, headers, ctype)

    # One branch per fault kind, a dispatch read top to bottom: splitting it scatters the kinds.
    def _apply_fault(self, fault: Fault, method, path, query):  # noqa: C901
        owner: FaultServer = self.server.owner
        a = fault.action
        if a.get("delay") is not None:
            owner._sleep(float(a["delay"]))
        if a.get("delay_event") is not None:
            ev = a["delay_event"]
            deadline = time.monotonic() + MAX_WAIT
            while not ev.is_set() and not owner._closing.is_set():
                ev.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                if time.monotonic() >= deadline:
                    break
        if owner._closing.is_set():
            raise _DropConnection()

        if a.get("drop_before"):
            raise _DropConnection()
        if a.get("drop_after_store"):
            self._api(method, path, query)
            raise _DropConnection()
        if a.get("garbage"):
            body = a.get("body")
            if body is None:
                body = b"<<this is not JSON>>\x00\xff{"
            self._send(int(a.get("status") or 200), body, a.get("headers"), "application/json")
            return
        if a.get("content_type"):
            body = a.get("body")
            if body is None:
                body = (
                    "<!DOCTYPE html><html><head><title>Login</title></head>"
                    "<body><p>Please sign in to the network.</p></body></html>"
                )
            self._send(int(a.get("status") or 200), body, a.get("headers"), a["content_type"])
            return
        if a.get("huge") is not None:
            self._send_huge(int(a["huge"]), a.get("headers"))
            return
        if a.get("stall"):
            self._stall(a.get("headers"))
            return
        if a.get("empty_listing"):
            self._send(
                200,
                {"jobs": [], "next_cursor": None},
                {"ETag": owner._fresh_etag(), **(a.get("headers") or {})},
            )
            return
        if a.get("fail_page") is not None:
            status = int(a.get("status") or 500)
            body = a.get("body")
            if body is None:
                body = {"error": f"injected failure of listing page {a['fail_page']}"}
            self._send(status, body, a.get("headers"), "application/json")
            return
        if a.get("status") is not None:
            status = int(a["status"])
            body = a.get("body")
            if body is None:
                body = {"error": f"injected fault ({status})"}
            self._send(status, body, a.get("headers"), "application/json")
            return
        # only a delay: handle normally
        self._respond(self._api(method, path, query))

    def _send_huge(self, size: int, headers):
        owner: FaultServer = self.server.owner
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(size))
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"[" + b"0," * 32767 + b"0"  # 65536 bytes
        sent = 0
        self.connection.settimeout(5.0)
        try:
            while sent < size and not owner._closing.is_set():
                n = min(len(chunk), size - sent)
                self.wfile.write(chunk[:n])
                sent += n
        except (OSError, ValueError):
            pass
        self._drop()

    def _stall(self, headers):
        owner: FaultServer = self.server.owner
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", "1000")
        self.end_headers()
        deadline = time.monotonic() + MAX_STALL
        sock = self.connection
        while not owner._closing.is_set() and time.monotonic() < deadline:
            try:
                r, _, _ = select.select([sock], [], [], 0.05)
                if r and not sock.recv(65536):
                    break  # the client went away
            except (OSError, ValueError):
                break
        self._drop()


# --------------------------------------------------------------------------------------------


class FaultServer:
    """In-memory implementation of the jobsyncd HTTP API with programmable faults."""

    def __init__(self, token: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.token = token
        self.listing_limit: int | None = None
        # The change feed (contract 6.7), off unless a test turns it on: `feed = True`.
        self.feed = False
        self.feed_limit: int | None = None  # force small feed pages
        self.feed_loop = False  # hostile: empty pages with `more` and new checkpoints forever
        self.feed_ignore_wait = False  # a long-poll answered at once, empty (no busy loop!)
        self.history = uuid.uuid4().hex[:12]
        self.expired_before = 0  # checkpoints older than this answer 410 expired
        self._change_counter = 0
        self._changed: dict = {}  # job id -> change number of its latest change
        self._tombs: dict = {}  # job id -> (local_id, change number)
        self._change_cond = threading.Condition()
        # POST /api/v1/batch (contract 6.3), off unless a test turns it on: `batch = True`.
        self.batch = False
        self.batch_truncate: int | None = None  # hostile: answer only this many results
        self.batch_max_ops = 500
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._jobs: dict = {}
        self._seq: dict = {}
        self._seq_counter = itertools.count(1)
        self._audio: dict = {}
        self._requests: list = []
        self._all_requests: list = []
        self._arrivals: list[float] = []  # time.monotonic() at each of `requests`' arrival
        self._faults: list[Fault] = []
        self._errors: list = []
        self._version = 0
        self._fresh = itertools.count(1)
        self._conns: set = set()
        self._threads: set = set()
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self.host, self.port = self._httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="faultserver",
            daemon=True,
        )
        self._serve_thread.start()
        self._closed = False

    # -- context manager -----------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self, timeout: float = JOIN_TIMEOUT):
        """Stop serving, cut every connection, and join the threads (bounded by timeout)."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        deadline = time.monotonic() + timeout
        try:
            self._httpd.shutdown()
        except Exception:  # noqa: BLE001
            pass
        self._serve_thread.join(max(0.1, deadline - time.monotonic()))
        try:
            self._httpd.server_close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads or time.monotonic() >= deadline:
                break
            threads[0].join(max(0.01, min(0.2, deadline - time.monotonic())))

    @property
    def alive_threads(self) -> int:
        """Connection threads still running (0 after a clean close)."""
        with self._lock:
            return sum(1 for t in self._threads if t.is_alive())

    # -- public state ---------------------------------------------------------------------------

    @property
    def jobs(self) -> dict:
        """id -> job dict (deep copies, taken under the lock)."""
        with self._lock:
            return copy.deepcopy(self._jobs)

    def snapshot(self) -> list:
        """All jobs (deep copies) in creation order."""
        with self._lock:
            return copy.deepcopy(list(self._jobs.values()))

    def job(self, job_id: str):
        with self._lock:
            j = self._jobs.get(job_id)
            return copy.deepcopy(j) if j is not None else None

    def job_by_local_id(self, local_id: str):
        with self._lock:
            for j in self._jobs.values():
                if j["local_id"] == local_id:
                    return copy.deepcopy(j)
        return None

    def audio_bytes(self, job_id: str):
        with self._lock:
            return self._audio.get(job_id)

    @property
    def requests(self) -> list:
        """[(method, path_with_query, headers_dict), ...] in arrival order (a copy), without
        the probes for features turned off (see `all_requests`)."""
        with self._lock:
            return list(self._requests)

    @property
    def arrivals(self) -> list[float]:
        """When each of `requests` arrived (time.monotonic(), the server's own clock): for the
        tests of how long the agent stayed away, measured where the requests land."""
        with self._lock:
            return list(self._arrivals)

    @property
    def all_requests(self) -> list:
        with self._lock:
            return list(self._all_requests)

    @property
    def errors(self) -> list:
        with self._lock:
            return list(self._errors)

    @property
    def etag(self) -> str:
        with self._lock:
            return self._etag()

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        """Requests seen with this method (None: any) whose path (with query) starts with prefix."""
        m = method.upper() if method else None
        with self._lock:
            return sum(
                1
                for (rm, rp, _) in self._requests
                if (m is None or rm == m) and rp.startswith(path_prefix)
            )

    def clear_requests(self):
        with self._lock:
            self._requests.clear()
            self._all_requests.clear()
            self._arrivals.clear()

    def wait_for(self, predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
        """Poll predicate() until true or timeout; returns its last truthiness."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    # -- server-side changes ----------------------------------------------------------------------

    def server_create(
        self,
        local_id=None,
        text="",
        metadata=None,
        audio: bytes | None = None,
        filename: str = "audio.bin",
        status: str = "submitted",
    ) -> dict:
        """Create a job directly on the server (as another client would); returns a copy."""
        with self._lock:
            job = self._create(local_id or str(uuid.uuid4()), text, metadata or {}, audio, filename)
            job["status"] = status
            return copy.deepcopy(job)

    def server_edit(self, job_id: str, **fields) -> dict:
        """Change fields of a job server-side (updated_at and the ETag change); returns a copy."""
        with self._lock:
            job = self._jobs[job_id]
            for k, v in fields.items():
                if k == "id":
                    raise ValueError("cannot change id")
                job[k] = copy.deepcopy(v)
            if "updated_at" not in fields:
                job["updated_at"] = _now()
            self._bump()
            self._touch(job_id)
            return copy.deepcopy(job)

    def server_delete(self, job_id: str) -> None:
        with self._lock:
            self._tomb(job_id, self._jobs[job_id]["local_id"])
            del self._jobs[job_id]
            self._seq.pop(job_id, None)
            self._audio.pop(job_id, None)
            self._bump()

    # -- faults ---------------------------------------------------------------------------------

    def add_fault(
        self, method: str | None = None, path: str | None = None, times: int | None = 1, **action
    ) -> Fault:
        """Program a fault.  path is a regex fullmatched against the path (no query).
        Faults are consumed in order of addition; the first match wins."""
        f = Fault(method, path, times, action)
        with self._lock:
            self._faults.append(f)
        return f

    def clear_faults(self):
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list:
        with self._lock:
            return list(self._faults)

    # -- internals ------------------------------------------------------------------------------

    def _note_error(self, e):
        with self._lock:
            self._errors.append(repr(e))

    def _sleep(self, seconds: float):
        self._closing.wait(max(0.0, min(seconds, MAX_WAIT)))

    def _log_request(self, method, path, headers):
        h = _Headers()
        for k, v in headers.items():
            h[k] = v
        with self._lock:
            self._all_requests.append((method, path, h))
            if not self._is_probe(path):
                self._requests.append((method, path, h))
                self._arrivals.append(time.monotonic())

    def _is_probe(self, path: str) -> bool:
        """A client asking for a feature this server has turned off (the change feed, batches,
        uploads): kept in `all_requests` only, so that the tests of job requests count those."""
        bare = path.split("?", 1)[0]
        return (
            (bare == API_PREFIX + "/changes" and not self.feed)
            or (bare == API_PREFIX + "/batch" and not self.batch)
            or bare.startswith(API_PREFIX + "/uploads")
        )

    def _take_fault(self, method, path, page):
        with self._lock:
            for f in self._faults:
                if f.matches(method, path, page):
                    f.hits += 1
                    return f
        return None

    def _etag(self) -> str:
        return f'"v{self._version}"'

    def _fresh_etag(self) -> str:
        return f'"fresh-{next(self._fresh)}-{uuid.uuid4().hex[:8]}"'

    def _bump(self):
        self._version += 1

    def _touch(self, jid: str) -> None:
        """Record a change of job `jid` in the change feed (under self._lock)."""
        self._change_counter += 1
        self._changed[jid] = self._change_counter
        self._tombs.pop(jid, None)
        with self._change_cond:
            self._change_cond.notify_all()

    def _tomb(self, jid: str, local_id) -> None:
        self._change_counter += 1
        self._changed.pop(jid, None)
        self._tombs[jid] = (local_id, self._change_counter)
        with self._change_cond:
            self._change_cond.notify_all()

    def new_history(self) -> None:
        """As `jobsyncd-server new-history` after a restore: every old checkpoint is diverged."""
        with self._lock:
            self.history = uuid.uuid4().hex[:12]

    def backup(self) -> dict:
        """A copy of the whole server state, as a database backup would hold it."""
        with self._lock:
            return copy.deepcopy(
                {
                    "jobs": self._jobs,
                    "seq": self._seq,
                    "audio": self._audio,
                    "changed": self._changed,
                    "tombs": self._tombs,
                    "counter": self._change_counter,
                }
            )

    def restore(self, state: dict, new_history: bool = True) -> None:
        """Roll the server back to `backup()`'s state; `new_history` as the documented restore
        procedure requires (without it, checkpoints ahead of the restored state still diverge)."""
        with self._lock:
            state = copy.deepcopy(state)
            self._jobs, self._seq, self._audio = state["jobs"], state["seq"], state["audio"]
            self._changed, self._tombs = state["changed"], state["tombs"]
            self._change_counter = state["counter"]
            self._bump()
            if new_history:
                self.history = uuid.uuid4().hex[:12]

    def expire_tombstones(self) -> None:
        """Drop every tombstone; checkpoints from before now answer 410 expired."""
        with self._lock:
            self._tombs.clear()
            self.expired_before = self._change_counter

    def _batch(self, handler, method):
        if not self.batch:
            handler._read_body()
            raise _HTTPError(404, "not found")
        if method != "POST":
            handler._read_body()
            raise _HTTPError(405, "method not allowed", {"Allow": "POST"})
        body = handler._read_body()
        if len(body) > 8 * MAX_JSON_BYTES:
            raise _HTTPError(413, "batch body too large")
        try:
            data = json.loads(body.decode("utf-8"))
            ops = data["operations"]
            assert isinstance(ops, list)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError):
            raise _HTTPError(400, "malformed batch") from None
        if len(ops) > self.batch_max_ops:
            raise _HTTPError(413, "too many operations")
        with self._lock:
            results = [self._batch_op(op) for op in ops]
        if self.batch_truncate is not None:
            results = results[: self.batch_truncate]
        return (200, {"results": results}, {}, None)

    def _batch_op(self, op) -> dict:
        def result(status, job=None, error=None):
            return {"status": status, "job": copy.deepcopy(job), "error": error}

        if not isinstance(op, dict):
            return result(400, error="operation is not an object")
        try:
            if op.get("op") == "create":
                self._validate(op)
                local_id = op.get("local_id")
                if not _is_uuid(local_id):
                    return result(422, error="local_id is missing or not a UUID")
                for j in self._jobs.values():
                    if j["local_id"] == local_id:
                        return result(200, j)
                return result(201, self._create(local_id, op.get("text"), op.get("metadata") or {}, None, None))
            if op.get("op") == "update":
                fields = op.get("fields") or {}
                self._validate(fields)
                job = self._jobs.get(op.get("id"))
                if job is None:
                    return result(404, error="job not found")
                for k in ("text", "metadata", "status"):
                    if k in fields:
                        job[k] = copy.deepcopy(fields[k])
                if "audio" in fields and fields["audio"] is None:
                    job["audio"] = None
                    self._audio.pop(job["id"], None)
                job["updated_at"] = _now()
                self._bump()
                self._touch(job["id"])
                return result(200, job)
            if op.get("op") == "delete":
                jid = op.get("id")
                if jid not in self._jobs:
                    return result(404, error="job not found")
                self._tomb(jid, self._jobs[jid]["local_id"])
                del self._jobs[jid]
                self._seq.pop(jid, None)
                self._audio.pop(jid, None)
                self._bump()
                return result(204)
        except _HTTPError as e:
            return result(e.status, error=e.message)
        return result(400, error="unknown op")

    def _changes(self, handler, query):
        handler._read_body()
        if not self.feed:
            raise _HTTPError(404, "not found")
        try:
            limit = int((query.get("limit") or [DEFAULT_LIMIT])[-1])
            wait = float((query.get("wait") or [0])[-1])
        except ValueError:
            raise _HTTPError(400, "limit and wait must be numbers") from None
        limit = max(1, min(limit, MAX_LIMIT))
        if self.feed_limit is not None:
            limit = self.feed_limit
        since = (query.get("since") or [""])[-1]
        if self.feed_ignore_wait:
            wait = 0.0
        deadline = time.monotonic() + min(max(wait, 0.0), 60.0, MAX_WAIT)
        while True:
            with self._lock:
                answer = self._changes_after(since, limit)
            if (
                answer[0] != 200
                or answer[1]["changes"]
                or time.monotonic() >= deadline
                or self._closing.is_set()
            ):
                return answer
            with self._change_cond:
                self._change_cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    def _changes_after(self, since: str, limit: int):
        after = 0
        if since:
            mm = re.fullmatch(r"([0-9a-f]+)\.(\d+)", since)
            if not mm or mm.group(1) != self.history or int(mm.group(2)) > self._change_counter:
                return (410, {"error": "checkpoint from another history", "reason": "diverged"}, {}, None)
            after = int(mm.group(2))
            if after < self.expired_before:
                return (410, {"error": "checkpoint expired", "reason": "expired"}, {}, None)
        if self.feed_loop:
            nxt = f"{self.history}.{after}-{next(self._fresh)}"
            return (200, {"changes": [], "next": nxt, "more": True}, {}, None)
        items = [(n, jid, None) for jid, n in self._changed.items() if n > after]
        items += [(n, jid, lid) for jid, (lid, n) in self._tombs.items() if n > after]
        items.sort(key=lambda t: t[0])
        chunk = items[:limit]
        out = []
        for _n, jid, lid in chunk:
            if jid in self._jobs:
                out.append(copy.deepcopy(self._jobs[jid]))
            else:
                out.append({"id": jid, "local_id": lid, "deleted": True})
        last = chunk[-1][0] if chunk else max(after, self._change_counter if not items else after)
        body = {"changes": out, "next": f"{self.history}.{last}", "more": len(items) > limit}
        return (200, body, {}, None)

    def _check_auth(self, headers):
        if self.token is None:
            return
        auth = headers.get("Authorization") or ""
        if auth != f"Bearer {self.token}":
            raise _HTTPError(401, "missing or wrong token", {"WWW-Authenticate": "Bearer"})

    @staticmethod
    def _page_of(query) -> int:
        cur = (query.get("cursor") or [""])[-1]
        if not cur:
            return 1
        m = re.fullmatch(r"p(\d+)\.(\d+)", cur)
        return int(m.group(1)) if m else 2

    def _create(self, local_id, text, metadata, audio, filename):
        ts = _now()
        jid = str(uuid.uuid4())
        job = {
            "id": jid,
            "local_id": local_id,
            "text": text,
            "metadata": copy.deepcopy(metadata),
            "status": "submitted",
            "audio": None,
            "created_at": ts,
            "updated_at": ts,
        }
        if audio is not None:
            job["audio"] = self._audio_meta(audio, filename)
            self._audio[jid] = bytes(audio)
        self._jobs[jid] = job
        self._seq[jid] = next(self._seq_counter)
        self._bump()
        self._touch(jid)
        return job

    @staticmethod
    def _audio_meta(data: bytes, filename) -> dict:
        return {
            "filename": filename or "audio",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    def _parse_body(self, handler: _Handler) -> tuple[dict, dict | None]:
        """-> (fields, audio) where audio is {"data", "filename"} or None."""
        ctype = handler.headers.get("Content-Type") or ""
        main = ctype.split(";", 1)[0].strip().lower()
        if main == "application/json":
            body = handler._read_body()
            if len(body) > MAX_JSON_BYTES:
                raise _HTTPError(413, "JSON body too large")
            try:
                data = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise _HTTPError(400, "malformed JSON body") from None
            if not isinstance(data, dict):
                raise _HTTPError(400, "JSON body must be an object")
            return data, None
        if main == "multipart/form-data":
            body = handler._read_body()
            try:
                parts = parse_multipart(body, ctype)
            except ValueError as e:
                raise _HTTPError(400, f"malformed multipart body: {e}") from None
            fields: dict = {}
            audio = None
            for name, part in parts.items():
                if name == "audio":
                    if len(part["data"]) > MAX_AUDIO_BYTES:
                        raise _HTTPError(413, "audio too large")
                    audio = {"data": part["data"], "filename": part["filename"]}
                    continue
                try:
                    value = part["data"].decode("utf-8")
                except UnicodeDecodeError:
                    raise _HTTPError(400, f"field {name} is not UTF-8") from None
                if name == "metadata":
                    try:
                        value = json.loads(value)
                    except ValueError:
                        raise _HTTPError(422, "metadata is not valid JSON") from None
                fields[name] = value
            return fields, audio
        # drain whatever was sent so the connection stays usable
        handler._read_body()
        raise _HTTPError(415, f"unsupported content type {ctype!r}")

    @staticmethod
    def _validate(fields: dict):
        if "text" in fields and fields["text"] is not None and not isinstance(fields["text"], str):
            raise _HTTPError(422, "text must be a string")
        if "metadata" in fields and not isinstance(fields["metadata"], dict):
            raise _HTTPError(422, "metadata must be an object")
        if "status" in fields and not isinstance(fields["status"], str):
            raise _HTTPError(422, "status must be a string")

    def _route(self, handler: _Handler, method, path, query, listing_override=None):
        if path == API_PREFIX + "/changes" and method == "GET":
            return self._changes(handler, query)
        if path == API_PREFIX + "/batch":
            return self._batch(handler, method)
        if path == JOBS_PATH or path == JOBS_PATH + "/":
            if method == "GET":
                return self._list(handler, query)
            if method == "POST":
                return self._post(handler)
            handler._read_body()
            raise _HTTPError(405, "method not allowed", {"Allow": "GET, POST"})
        m = re.fullmatch(re.escape(JOBS_PATH) + r"/([^/]+)", path)
        if not m:
            handler._read_body()
            raise _HTTPError(404, "not found")
        jid = m.group(1)
        if method == "GET":
            with self._lock:
                job = self._jobs.get(jid)
                if job is None:
                    raise _HTTPError(404, "job not found")
                return (200, copy.deepcopy(job), {}, None)
        if method == "PATCH":
            return self._patch(handler, jid)
        if method == "DELETE":
            handler._read_body()
            with self._lock:
                if jid not in self._jobs:
                    raise _HTTPError(404, "job not found")
                self._tomb(jid, self._jobs[jid]["local_id"])
                del self._jobs[jid]
                self._seq.pop(jid, None)
                self._audio.pop(jid, None)
                self._bump()
            return (204, None, {}, None)
        handler._read_body()
        raise _HTTPError(405, "method not allowed", {"Allow": "GET, PATCH, DELETE"})

    def _list(self, handler: _Handler, query):
        handler._read_body()
        raw_limit = (query.get("limit") or [None])[-1]
        if raw_limit in (None, ""):
            limit = DEFAULT_LIMIT
        else:
            try:
                limit = int(raw_limit)
            except ValueError:
                raise _HTTPError(400, "limit must be an integer") from None
            if limit < 1:
                raise _HTTPError(400, "limit must be positive")
        limit = min(limit, MAX_LIMIT)
        if self.listing_limit is not None:
            limit = int(self.listing_limit)
        cur = (query.get("cursor") or [""])[-1]
        after, page = 0, 1
        if cur:
            mm = re.fullmatch(r"p(\d+)\.(\d+)", cur)
            if not mm:
                raise _HTTPError(400, "invalid cursor")
            page, after = int(mm.group(1)), int(mm.group(2))
        with self._lock:
            etag = self._etag()
            inm = handler.headers.get("If-None-Match")
            if inm and etag in [t.strip() for t in inm.split(",")] or inm == "*":
                return (304, None, {"ETag": etag}, None)
            ordered = sorted(self._jobs, key=lambda j: self._seq[j])
            rest = [j for j in ordered if self._seq[j] > after]
            chunk = rest[:limit]
            jobs = [copy.deepcopy(self._jobs[j]) for j in chunk]
            nxt = None
            if len(rest) > limit:
                nxt = f"p{page + 1}.{self._seq[chunk[-1]]}"
        return (200, {"jobs": jobs, "next_cursor": nxt}, {"ETag": etag}, None)

    def _post(self, handler: _Handler):
        fields, audio = self._parse_body(handler)
        local_id = fields.get("local_id")
        if not _is_uuid(local_id):
            raise _HTTPError(422, "local_id is missing or not a UUID")
        self._validate(fields)
        with self._lock:
            for j in self._jobs.values():
                if j["local_id"] == local_id:
                    return (200, copy.deepcopy(j), {}, None)
            job = self._create(
                local_id,
                fields.get("text"),
                fields.get("metadata") or {},
                audio["data"] if audio else None,
                audio["filename"] if audio else None,
            )
            return (201, copy.deepcopy(job), {"Location": f"{JOBS_PATH}/{job['id']}"}, None)

    def _patch(self, handler: _Handler, jid):
        fields, audio = self._parse_body(handler)
        self._validate(fields)
        with self._lock:
            job = self._jobs.get(jid)
            if job is None:
                raise _HTTPError(404, "job not found")
            for k in ("text", "metadata", "status"):
                if k in fields:
                    job[k] = copy.deepcopy(fields[k])
            if "audio" in fields and fields["audio"] is None:
                job["audio"] = None
                self._audio.pop(jid, None)
            if audio is not None:
                job["audio"] = self._audio_meta(audio["data"], audio["filename"])
                self._audio[jid] = bytes(audio["data"])
            job["updated_at"] = _now()
            self._bump()
            self._touch(jid)
            return (200, copy.deepcopy(job), {}, None)


# --------------------------------------------------------------------------------------------
# TCP proxy


class FaultProxy:
    """TCP proxy on 127.0.0.1 (free port) toward target_host:target_port with network faults.

    Modes, settable at any time:
      latency = seconds       sleep before forwarding each chunk (both directions)
      reset_after = N|None    after N bytes from the server (per connection, counted from when
                              the mode was set), reset the client connection (SO_LINGER 0)
      stall = bool            forward nothing (new connections are accepted but not connected)
      closed = bool           True closes the listening socket (connection refused) and drops the
                              open connections; False (or reopen()) listens again, same port
    """

    CHUNK = 65536

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1", port: int = 0):
        self.target = (target_host, int(target_port))
        self.host = host
        self.latency: float = 0.0
        self.stall: bool = False
        self._reset_after: int | None = None
        self._reset_gen = 0
        self._lock = threading.RLock()
        self._listen_lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set = set()
        self._threads: set = set()
        self.connections = 0  # accepted so far
        self._listener = self._listen(port)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="faultproxy", daemon=True
        )
        self._accept_thread.start()
        self._closed_all = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- modes ----------------------------------------------------------------------------------

    @property
    def reset_after(self):
        return self._reset_after

    @reset_after.setter
    def reset_after(self, n):
        with self._lock:
            self._reset_after = None if n is None else int(n)
            self._reset_gen += 1

    @property
    def closed(self) -> bool:
        return self._listener is None

    @closed.setter
    def closed(self, value: bool):
        if value:
            with self._listen_lock:
                if self._listener is not None:
                    try:
                        self._listener.close()
                    except OSError:
                        pass
                    self._listener = None
            self.drop_connections()
        else:
            self.reopen()

    def reopen(self):
        with self._listen_lock:
            if self._listener is None and not self._stop.is_set():
                self._listener = self._listen(self.port)

    def drop_connections(self):
        """Close every open proxied connection."""
        with self._lock:
            socks = []
            for pair in self._conns:
                socks.extend(s for s in pair if s is not None)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self, timeout: float = JOIN_TIMEOUT):
        if self._closed_all:
            return
        self._closed_all = True
        self._stop.set()
        deadline = time.monotonic() + timeout
        self._accept_thread.join(max(0.1, deadline - time.monotonic()))
        with self._listen_lock:
            if self._listener is not None:
                try:
                    self._listener.close()
                except OSError:
                    pass
                self._listener = None
        self.drop_connections()
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads or time.monotonic() >= deadline:
                break
            threads[0].join(max(0.01, min(0.2, deadline - time.monotonic())))

    @property
    def alive_threads(self) -> int:
        with self._lock:
            n = sum(1 for t in self._threads if t.is_alive())
        return n + (1 if self._accept_thread.is_alive() else 0)

    # -- internals ------------------------------------------------------------------------------

    def _listen(self, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(64)
        s.setblocking(False)
        return s

    def _accept_loop(self):
        while not self._stop.is_set():
            conn = None
            with self._listen_lock:
                lst = self._listener
                if lst is not None:
                    try:
                        r, _, _ = select.select([lst], [], [], 0.05)
                        if r:
                            conn, _ = lst.accept()
                    except (OSError, ValueError):
                        conn = None
            if lst is None:
                self._stop.wait(0.05)
                continue
            if conn is None:
                continue
            conn.setblocking(True)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            self.connections += 1
            t = threading.Thread(
                target=self._serve, args=(conn,), name="faultproxy-conn", daemon=True
            )
            with self._lock:
                self._threads.add(t)
            t.start()

    def _wait(self, seconds):
        if seconds and seconds > 0:
            self._stop.wait(min(seconds, MAX_WAIT))

    def _serve(self, client: socket.socket):
        pair = [client, None]
        key = None
        with self._lock:
            key = _Pair(pair)
            self._conns.add(key)
        try:
            self._pump(client, key)
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._conns.discard(key)
                self._threads.discard(threading.current_thread())
            for s in key:
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    # One loop relays both directions with a fault possible at each step; kept whole to read.
    def _pump(self, client: socket.socket, key: _Pair):  # noqa: C901
        upstream = None
        from_server = 0
        gen = self._reset_gen
        client_open = True
        while not self._stop.is_set():
            if self.stall:
                # forward nothing; notice only a client that goes away
                r, _, _ = select.select([client], [], [], 0.05)
                if r:
                    try:
                        if not client.recv(1, socket.MSG_PEEK):
                            return
                    except OSError:
                        return
                    self._stop.wait(0.05)
                continue
            if upstream is None:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                upstream.settimeout(None)
                key[1] = upstream
                if self._stop.is_set():
                    return
            socks = [upstream] + ([client] if client_open else [])
            r, _, _ = select.select(socks, [], [], 0.05)
            for s in r:
                data = s.recv(self.CHUNK)
                if s is client:
                    if not data:
                        client_open = False
                        try:
                            upstream.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    self._wait(self.latency)
                    if self.stall:
                        # mode switched mid-connection: hold this chunk until unstalled
                        while self.stall and not self._stop.is_set():
                            self._stop.wait(0.05)
                    upstream.sendall(data)
                else:
                    if not data:
                        return  # server closed: close client too (finally)
                    self._wait(self.latency)
                    while self.stall and not self._stop.is_set():
                        self._stop.wait(0.05)
                    with self._lock:
                        limit, cur_gen = self._reset_after, self._reset_gen
                    if cur_gen != gen:
                        gen, from_server = cur_gen, 0
                    if limit is not None and from_server + len(data) >= limit:
                        allowed = max(0, limit - from_server)
                        if allowed:
                            client.sendall(data[:allowed])
                        self._reset(client)
                        return
                    client.sendall(data)
                    from_server += len(data)

    @staticmethod
    def _reset(sock: socket.socket):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass


class _Pair(list):
    """A mutable [client, upstream] pair usable in a set (identity hash)."""

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other
