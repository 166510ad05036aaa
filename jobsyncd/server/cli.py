"""`jobsyncd-server`: serve the reference WSGI app with a small threaded HTTP/1.1 server.

wsgiref's handler speaks HTTP/1.0 (no keep-alive) and leaves Nagle on, which caps a client at
~23 requests/s; this runner keeps connections alive, sets TCP_NODELAY, sends every answer in one
write with a Content-Length, and logs one line per request on stderr.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from jobsyncd import __version__
from jobsyncd.server.app import (
    CLOSE_CONNECTION_KEY,
    ENV_AUDIO_DIR,
    ENV_DB,
    ENV_MAX_UPLOAD,
    ENV_TOKEN_FILE,
    ENV_TOMBSTONE_DAYS,
    USER_KEY,
    ConfigError,
    create_app,
    default_db_path,
)
from jobsyncd.server.storage import StorageError, open_storage

_LINGER_SECONDS = 1.0
_LINGER_BYTES = 16 << 20


class _LengthReader:
    """The body of a request with a Content-Length; never reads into the next request."""

    def __init__(self, rfile: io.BufferedIOBase, length: int) -> None:
        self._rfile = rfile
        self.remaining = length

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self.remaining:
            size = self.remaining
        if size == 0:
            return b""
        data = self._rfile.read(size)
        self.remaining -= len(data)
        if not data:
            raise ConnectionError("client closed the connection mid-body")
        return data

    def readline(self, size: int = -1) -> bytes:
        if size < 0 or size > self.remaining:
            size = self.remaining
        data = self._rfile.readline(size)
        self.remaining -= len(data)
        return data


class _ChunkedReader:
    """A `Transfer-Encoding: chunked` body (RFC 9112 7.1); trailers are read and dropped."""

    def __init__(self, rfile: io.BufferedIOBase) -> None:
        self._rfile = rfile
        self._left = 0
        self.done = False

    def _line(self) -> bytes:
        line = self._rfile.readline(4098)
        if not line.endswith(b"\r\n"):
            raise ValueError("malformed chunked body")
        return line

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while not self.done and (size < 0 or len(out) < size):
            if self._left == 0:
                digits = self._line().split(b";", 1)[0].strip()
                if not digits or len(digits) > 16:
                    raise ValueError("malformed chunk size")
                self._left = int(digits, 16)
                if self._left == 0:
                    while self._line() != b"\r\n":
                        pass
                    self.done = True
                    break
            want = self._left if size < 0 else min(self._left, size - len(out))
            data = self._rfile.read(want)
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            out += data
            self._left -= len(data)
            if self._left == 0 and self._rfile.read(2) != b"\r\n":
                raise ValueError("malformed chunked body")
        return bytes(out)

    def readline(self, size: int = -1) -> bytes:
        return self.read(size if size >= 0 else 8192)


class WSGIRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"jobsyncd-server/{__version__}"
    sys_version = ""
    disable_nagle_algorithm = True  # TCP_NODELAY on every accepted socket
    timeout = 120  # an idle keep-alive connection is closed after this many seconds

    server: WSGIServer

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = "HTTP/1.1"
            self.command = ""
            self.send_error(414, "request line too long")
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        try:
            self._run_app()
        except (ConnectionError, TimeoutError, BrokenPipeError):
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found before the app runs (bad request line, headers) answer JSON too."""
        import json

        text = message or self.responses.get(code, ("error",))[0]
        body = json.dumps({"error": text}).encode()
        self.close_connection = True
        self._write(code, [("Content-Type", "application/json")], body, close=True)
        self._log(code, len(body), "-", 0.0)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"jobsyncd-server: {self.address_string()} {format % args}\n")

    def _log(self, code: int, size: int, user: str, started: float) -> None:
        ms = (time.perf_counter() - started) * 1000 if started else 0.0
        sys.stderr.write(
            f'{self.client_address[0]} {user} "{self.requestline}" {code} {size} {ms:.1f}ms\n'
        )

    def _write(self, code: int, headers: list[tuple[str, str]], body: bytes, close: bool) -> None:
        phrase = self.responses.get(code, ("",))[0]
        lines = [f"HTTP/1.1 {code} {phrase}", f"Server: {self.server_version}"]
        lines.append(f"Date: {self.date_time_string()}")
        lines += [f"{name}: {value}" for name, value in headers]
        if code not in (204, 304) and not any(n.lower() == "content-length" for n, _ in headers):
            lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.command == "HEAD" or code in (204, 304):
            body = b""
        try:
            self.wfile.write(head + body)
        except OSError:
            self.close_connection = True

    def _run_app(self) -> None:
        started = time.perf_counter()
        length = self.headers.get("Content-Length")
        coding = self.headers.get("Transfer-Encoding")
        reader: _LengthReader | _ChunkedReader
        content_length = ""  # none for a chunked body
        if coding is not None:
            if coding.strip().lower() != "chunked" or length is not None:
                self.send_error(400, "unsupported Transfer-Encoding")
                return
            reader = _ChunkedReader(self.rfile)
        else:
            content_length = (length or "0").strip()
            if not content_length.isdigit() or len(content_length) > 18:
                self.send_error(400, "Content-Length is not a number")
                return
            reader = _LengthReader(self.rfile, int(content_length))
        environ = self._environ(reader, content_length)
        close_requested: list[bool] = []
        environ[CLOSE_CONNECTION_KEY] = lambda: close_requested.append(True)
        captured: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            captured[:] = [status, headers]
            return lambda data: None  # the app never uses write(); everything goes in the return

        result = self.server.app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close_result = getattr(result, "close", None)
            if close_result is not None:
                close_result()
        status, headers = captured
        code = int(status.split(" ", 1)[0])
        unread = not reader.done
        if unread or close_requested:
            self.close_connection = True
        self._write(code, headers, body, close=self.close_connection)
        self._log(code, len(body), environ.get(USER_KEY, "-"), started)
        if unread:
            self._linger()

    def _linger(self) -> None:
        """Close after an answer to a body we did not read whole, without a reset that could make
        the client lose the answer: stop writing, then read and drop for a short while."""
        sock = self.connection
        try:
            self.wfile.flush()
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(_LINGER_SECONDS)
            deadline = time.monotonic() + _LINGER_SECONDS
            dropped = 0
            while time.monotonic() < deadline and dropped < _LINGER_BYTES:
                data = sock.recv(1 << 16)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass

    def _environ(self, reader: _LengthReader | _ChunkedReader, length: str) -> dict[str, Any]:
        target = self.path
        if not target.startswith("/"):
            target = urlsplit(target).path + ("?" + urlsplit(target).query if "?" in target else "")
        path, _, query = target.partition("?")
        host, port = self.server.server_address[:2]
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": length or "",
            "SERVER_NAME": str(host),
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0],
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": reader,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name in set(self.headers.keys()):
            key = name.upper().replace("-", "_")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH") or "_" in name:
                continue
            environ["HTTP_" + key] = ",".join(self.headers.get_all(name) or [])
        return environ


class WSGIServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up a stop
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: Callable[..., Any]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, WSGIRequestHandler)
        self.app = app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobsyncd-server",
        description="The reference jobsyncd job server (HTTP API of contract section 7).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8600, help="port (8600; 0 picks a free one)")
    parser.add_argument(
        "--db",
        metavar="FILE_OR_URL",
        help=f"SQLite database file, or a postgresql:// URL (${ENV_DB})",
    )
    parser.add_argument("--audio-dir", help=f"directory for audio files (${ENV_AUDIO_DIR})")
    parser.add_argument(
        "--token-file", help=f"token file; none accepts everyone (${ENV_TOKEN_FILE})"
    )
    parser.add_argument(
        "--max-upload-bytes",
        type=int,
        help=f"largest audio part, default 64 MiB (${ENV_MAX_UPLOAD})",
    )
    parser.add_argument(
        "--tombstone-days",
        type=float,
        help=f"how long deleted jobs stay in the change feed, default 30 (${ENV_TOMBSTONE_DAYS})",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.epilog = (
        "jobsyncd-server new-history [--db FILE_OR_URL]: give a restored database a new history "
        "id (run it with the server stopped)"
    )
    return parser


def _new_history(argv: list[str]) -> int:
    """`jobsyncd-server new-history`: after a restore, every agent's checkpoint reads as
    diverged, so that agents resync without losing a job (contract 6.7)."""
    parser = argparse.ArgumentParser(
        prog="jobsyncd-server new-history",
        description="Give a restored database a new history id (run with the server stopped).",
    )
    parser.add_argument(
        "--db", metavar="FILE_OR_URL", help=f"SQLite database file or postgresql:// URL (${ENV_DB})"
    )
    args = parser.parse_args(argv)
    db = args.db or os.environ.get(ENV_DB) or default_db_path()
    if not db.startswith(("postgresql://", "postgres://")) and not os.path.exists(db):
        print(f"jobsyncd-server: no database at {db}", file=sys.stderr)
        return 2
    try:
        storage = open_storage(db)
        try:
            history = storage.new_history()
        finally:
            storage.close()
    except StorageError as e:
        print(f"jobsyncd-server: {e}", file=sys.stderr)
        return 2
    print(f"jobsyncd-server: {storage.description} has a new history id {history}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["new-history"]:
        return _new_history(argv[1:])
    args = _parser().parse_args(argv)
    try:
        app = create_app(
            db_path=args.db,
            audio_dir=args.audio_dir,
            token_file=args.token_file,
            max_upload_bytes=args.max_upload_bytes,
            tombstone_days=args.tombstone_days,
        )
    except (ConfigError, StorageError, OSError) as e:
        print(f"jobsyncd-server: {e}", file=sys.stderr)
        return 2
    try:
        server = WSGIServer((args.host, args.port), app)
    except OSError as e:
        print(f"jobsyncd-server: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = str(server.server_address[0]), server.server_address[1]  # str: AF_INET(6)
    shown = f"[{host}]" if ":" in str(host) else host
    print(f"jobsyncd-server: listening on http://{shown}:{port}", file=sys.stderr, flush=True)
    print(
        f"jobsyncd-server: database {app.storage.description}, audio in {app.audio_dir.root}",
        file=sys.stderr,
    )
    if app.tokens is None:
        print(
            "jobsyncd-server: warning: no token file, so every client is accepted",
            file=sys.stderr,
            flush=True,
        )
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()  # the main loop below stops the server

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2})
    serving.start()
    while not stop.wait(0.5) and serving.is_alive():
        pass
    server.shutdown()
    server.server_close()
    serving.join()
    print("jobsyncd-server: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
