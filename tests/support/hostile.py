"""A small hostile HTTP server on 127.0.0.1 made of raw sockets, for the tests of issue 9.

Each connection's request (head and a Content-Length body) is read, recorded, and handed to a
behaviour function that writes whatever it likes on the raw socket: an answer trickled one byte
at a time, headers echoed into an error, empty listing pages forever. A behaviour that loops must
check `server.stopping` (every loop here is bounded by it and by MAX_SECONDS). Also a recording
"proxy" (any connection is recorded and answered 502). Standard library only.

    def behave(request, conn, server): conn.sendall(b"HTTP/1.1 204 No Content\\r\\n\\r\\n")
    with HostileServer(behave) as srv:
        srv.url, srv.requests
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SECONDS = 120.0  # no behaviour runs longer than this, whatever the client does
JOIN_TIMEOUT = 5.0


@dataclass
class Request:
    method: str
    target: str  # path with its query string
    headers: dict[str, str]  # lower-case names
    head: bytes  # the raw request line and headers, as received
    body: bytes = b""
    received_at: float = field(default_factory=time.monotonic)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


Behaviour = Callable[[Request, socket.socket, "HostileServer"], None]


class HostileServer:
    def __init__(self, behave: Behaviour, tls: ssl.SSLContext | None = None) -> None:
        self.behave = behave
        self.tls = tls  # a server-side context: https
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def __enter__(self) -> HostileServer:
        t = threading.Thread(target=self._accept, name="hostile-accept", daemon=True)
        self._threads.append(t)
        t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(JOIN_TIMEOUT)

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            if self.tls is not None:
                with self._lock:
                    self._conns.discard(conn)
                conn = self.tls.wrap_socket(conn, server_side=True)
                with self._lock:
                    self._conns.add(conn)
            request = _read_request(conn)
            if request is None:
                return
            with self._lock:
                self._requests.append(request)
            self.behave(request, conn, self)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self._lock:
                self._conns.discard(conn)

    def trickle(self, conn: socket.socket, data: bytes, every: float) -> None:
        """Send `data` one byte at a time, `every` seconds apart, until done, the client goes
        away, the server stops or MAX_SECONDS pass."""
        deadline = time.monotonic() + MAX_SECONDS
        for i in range(len(data)):
            if self.stopping.wait(every) or time.monotonic() > deadline:
                return
            conn.sendall(data[i : i + 1])


def _read_request(conn: socket.socket) -> Request | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > 1 << 20:
            return None
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = (lines[0].split(" ") + ["", ""])[:3]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length") or 0)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Request(method, target, headers, head, rest[:length])


def answer(
    conn: socket.socket,
    status: int,
    body: bytes | dict | list = b"",
    headers: dict[str, str] | None = None,
) -> None:
    """A whole answer with Content-Length, then the connection is closed."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    lines = [f"HTTP/1.1 {status} Whatever"]
    for name, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
        lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def recording_proxy() -> HostileServer:
    """A "proxy" that records every connection (in `.requests`) and answers 502."""

    def behave(request: Request, conn: socket.socket, server: HostileServer) -> None:
        answer(conn, 502, {"error": "this proxy should never have been used"})

    return HostileServer(behave)
