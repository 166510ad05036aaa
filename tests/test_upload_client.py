"""The agent's tus client (jobsyncd.upload) against the server's upload handler on 127.0.0.1.

The handler runs in the reference server's own HTTP/1.1 runner (keep-alive, as in production)
with a trivial token shim; faults come from a TCP proxy of ours that cuts a connection in the
middle of a chunk or flips one byte, and counts the bytes that went towards the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jobsyncd.remote import AuthRefused, BackOff, Offline, Permanent, Remote, Transient
from jobsyncd.server.cli import WSGIServer
from jobsyncd.server.uploads import UploadStore, handle
from jobsyncd.upload import Uploader, UploadGone

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
CHUNK = 64 << 10
SIZE = 5 * CHUNK + 1234  # six chunks, the last one short


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Proxy:
    """Forwards 127.0.0.1 connections to `target`; counts the bytes sent towards it. With
    `cut_at`, the connection carrying that byte of the client's stream is closed (both ways)
    right before it; with `flip_at`, that byte is inverted. Each fault fires once."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.upstream_bytes = 0
        self.cut_at: int | None = None
        self.flip_at: int | None = None
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            with self._lock:
                self._socks += [client, upstream]
            self._spawn(self._pump, client, upstream, True)
            self._spawn(self._pump, upstream, client, False)

    def _forward(self, data: bytes, src: socket.socket, dst: socket.socket) -> bool:
        with self._lock:
            start = self.upstream_bytes
            end = start + len(data)
            if self.cut_at is not None and start <= self.cut_at < end:
                keep = self.cut_at - start
                self.cut_at = None
                self.upstream_bytes += keep
                dst.sendall(data[:keep])
                return False
            if self.flip_at is not None and start <= self.flip_at < end:
                i = self.flip_at - start
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                self.flip_at = None
            self.upstream_bytes = end
        dst.sendall(data)
        return True

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        src.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    break
                if upstream:
                    if not self._forward(data, src, dst):
                        break
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                _close(sock)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                _close(sock)
        for thread in self._threads:
            thread.join(5)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@dataclass
class Env:
    store: UploadStore
    clock: FakeClock
    server_url: str  # http://127.0.0.1:PORT
    proxy: Proxy
    tmp: Path
    remotes: list[Remote]
    location_prefix: dict[str, str]  # "absolute": a prefix the server puts on its Location
    methods: list[str]  # of every request the server answered

    def uploader(self, via_proxy: bool = False, token: str = "tok-alice", **kw: Any) -> Uploader:
        base = self.proxy.url if via_proxy else self.server_url
        remote = Remote(base + "/api/v1", token, timeout=5)
        self.remotes.append(remote)
        kw.setdefault("chunk_bytes", CHUNK)
        return Uploader(remote, **kw)

    def audio(self, size: int = SIZE, name: str = "dictation.wav") -> Path:
        path = self.tmp / name
        path.write_bytes(os.urandom(size))
        return path


def run_server(app: Callable[..., Any]) -> tuple[WSGIServer, threading.Thread]:
    server = WSGIServer(("127.0.0.1", 0), app)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    return server, thread


def stop_server(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    clock = FakeClock()
    store = UploadStore(tmp_path / "audio", 64 << 20, expiry_seconds=3600, clock=clock)
    location_prefix: dict[str, str] = {}

    methods: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        methods.append(environ["REQUEST_METHOD"])
        auth = environ.get("HTTP_AUTHORIZATION", "")
        user = TOKENS.get(auth[7:]) if auth.startswith("Bearer ") else None
        if "absolute" not in location_prefix:
            return handle(environ, start_response, user, store)

        def absolute(status: str, headers: list[tuple[str, str]], *a: Any) -> Any:
            base = location_prefix["absolute"]
            headers = [(k, base + v if k == "Location" else v) for k, v in headers]
            return start_response(status, headers, *a)

        return handle(environ, absolute, user, store)

    server, thread = run_server(app)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    proxy = Proxy(server.server_address[1])
    e = Env(store, clock, url, proxy, tmp_path, [], location_prefix, methods)
    try:
        yield e
    finally:
        for remote in e.remotes:
            remote.close()
        proxy.close()
        stop_server(server, thread)


def upload_id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_probe_says_offered_on_a_tus_server(env: Env) -> None:
    up = env.uploader()
    assert up.probe() is True
    assert up.checksum_algorithm == "sha256"
    assert up.max_size == 64 << 20


@pytest.mark.parametrize(
    "status", ["404 Not Found", "405 Method Not Allowed", "501 Not Implemented"]
)
def test_probe_says_not_offered_on_404_405_or_501(env: Env, status: str) -> None:
    def plain(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(status, [("Content-Type", "application/json"), ("Allow", "GET, POST")])
        return [b'{"error": "not found"}']

    server, thread = run_server(plain)
    try:
        remote = Remote(f"http://127.0.0.1:{server.server_address[1]}/api/v1", timeout=5)
        with contextlib.closing(remote):
            assert Uploader(remote, chunk_bytes=CHUNK).probe() is False
    finally:
        stop_server(server, thread)


def test_a_new_upload_goes_straight_to_its_first_chunk_without_a_head(env: Env) -> None:
    path = env.audio()
    up = env.uploader()
    url = up.start(str(path), "a.wav")
    env.methods.clear()
    outcome = up.resume(url, str(path), new=True)
    assert outcome.complete and outcome.sha256 == sha256_of(path)
    assert env.methods == ["PATCH"] * -(-SIZE // CHUNK)
    env.methods.clear()
    up.resume(url, str(path))  # one recorded earlier: the server's offset first
    assert env.methods == ["HEAD"]


def test_a_whole_upload_goes_up_in_chunks_each_confirmed_once(env: Env) -> None:
    path = env.audio()
    up = env.uploader()
    assert up.probe()
    url = up.start(str(path), "dictation.wav")
    assert url.startswith(env.server_url + "/api/v1/uploads/")
    confirmed: list[int] = []
    outcome = up.resume(url, str(path), lambda u, off: confirmed.append(off))
    assert outcome.complete and outcome.sha256 == sha256_of(path)
    assert confirmed == [min(CHUNK * i, SIZE) for i in range(1, 7)]
    info = env.store.head("alice", upload_id(url))
    assert (info.offset, info.stored, info.received) == (SIZE, SIZE, SIZE)
    assert info.filename == "dictation.wav"
    consumed = env.store.consume("alice", upload_id(url))
    assert consumed.sha256 == outcome.sha256
    assert consumed.path.read_bytes() == path.read_bytes()


def test_an_absolute_location_is_accepted_too(env: Env) -> None:
    env.location_prefix["absolute"] = env.server_url
    path = env.audio()
    up = env.uploader()
    url = up.start(str(path), "a.wav")
    assert url.startswith(env.server_url + "/api/v1/uploads/")
    assert up.resume(url, str(path)).complete


def test_a_connection_cut_mid_chunk_resumes_and_each_byte_is_stored_once(env: Env) -> None:
    path = env.audio()
    up = env.uploader(via_proxy=True)
    url = up.start(str(path), "dictation.wav")
    env.proxy.cut_at = env.proxy.upstream_bytes + 2 * CHUNK + CHUNK // 2  # inside chunk 3
    confirmed: list[int] = []
    with pytest.raises(Transient) as cut:
        up.resume(url, str(path), lambda u, off: confirmed.append(off))
    assert type(cut.value) is Transient  # not UploadGone: the upload is still there
    assert confirmed and confirmed[-1] < 3 * CHUNK
    outcome = up.resume(url, str(path), lambda u, off: confirmed.append(off))
    assert outcome.complete and outcome.sha256 == sha256_of(path)
    info = env.store.head("alice", upload_id(url))
    assert info.stored == SIZE  # no byte stored twice
    assert info.received <= SIZE + CHUNK  # only the cut chunk's part went twice
    assert env.proxy.upstream_bytes <= SIZE + CHUNK + 16 * 1024  # headers of ~20 requests
    assert env.store.consume("alice", upload_id(url)).path.read_bytes() == path.read_bytes()


def test_resume_never_sends_a_byte_the_server_confirmed(env: Env) -> None:
    path = env.audio()
    first = env.uploader(via_proxy=True)
    url = first.start(str(path), "a.wav")
    assert not first.resume(url, str(path), should_stop=_stop_after(first, 4)).complete
    confirmed = env.store.head("alice", upload_id(url)).offset
    before = env.proxy.upstream_bytes
    assert env.uploader(via_proxy=True).resume(url, str(path)).complete
    assert env.proxy.upstream_bytes - before <= (SIZE - confirmed) + 8 * 1024
    assert env.store.head("alice", upload_id(url)).stored == SIZE


def _stop_after(up: Uploader, calls: int) -> Callable[[], bool]:
    asked = [0]

    def should_stop() -> bool:
        asked[0] += 1
        return asked[0] > calls

    return should_stop


def test_should_stop_stops_between_chunks(env: Env) -> None:
    path = env.audio()
    up = env.uploader()
    url = up.start(str(path), "a.wav")
    outcome = up.resume(url, str(path), should_stop=_stop_after(up, 2))
    assert (outcome.complete, outcome.offset, outcome.sha256) == (False, 2 * CHUNK, None)
    assert env.store.head("alice", upload_id(url)).offset == 2 * CHUNK
    finished = up.resume(url, str(path))
    assert finished.complete and finished.sha256 == sha256_of(path)


def test_an_upload_the_server_lost_raises_upload_gone_and_a_new_one_finishes(env: Env) -> None:
    path = env.audio()
    up = env.uploader()
    url = up.start(str(path), "a.wav")
    up.resume(url, str(path), should_stop=_stop_after(up, 1))
    env.store.terminate("alice", upload_id(url))
    with pytest.raises(UploadGone):
        up.resume(url, str(path))
    again = up.start(str(path), "a.wav")
    assert again != url
    assert up.resume(again, str(path)).complete


def test_an_expired_upload_raises_upload_gone(env: Env) -> None:
    path = env.audio()
    up = env.uploader()
    url = up.start(str(path), "a.wav")
    env.clock.now += 3601
    with pytest.raises(UploadGone):
        up.resume(url, str(path))


def test_an_upload_for_a_file_of_another_size_raises_upload_gone(env: Env) -> None:
    path = env.audio()
    up = env.uploader()
    url = up.start(str(path), "a.wav")
    path.write_bytes(b"a new, shorter recording")
    with pytest.raises(UploadGone):
        up.resume(url, str(path))


def test_an_upload_url_on_another_host_is_never_contacted(env: Env) -> None:
    path = env.audio()
    with pytest.raises(UploadGone):
        env.uploader().resume("http://127.0.0.2:9/api/v1/uploads/" + "a" * 32, str(path))
    env.uploader().abandon("http://127.0.0.2:9/api/v1/uploads/" + "a" * 32)  # left alone


@pytest.mark.parametrize("chunk", [0, 1])  # the first one's checksum is the file's hash so far
def test_a_flipped_byte_gets_460_and_the_chunk_is_sent_again(env: Env, chunk: int) -> None:
    path = env.audio()
    up = env.uploader(via_proxy=True)
    url = up.start(str(path), "a.wav")
    env.proxy.flip_at = env.proxy.upstream_bytes + 1500 + chunk * CHUNK  # in a chunk's body
    outcome = up.resume(url, str(path))
    assert outcome.complete and outcome.sha256 == sha256_of(path)
    info = env.store.head("alice", upload_id(url))
    assert info.stored == SIZE
    assert SIZE < info.received <= SIZE + CHUNK  # the bad chunk was read, then discarded
    assert env.store.consume("alice", upload_id(url)).path.read_bytes() == path.read_bytes()


def test_a_409_reads_the_offset_again_and_goes_on_from_there(env: Env) -> None:
    path = env.audio()
    data = path.read_bytes()
    up = env.uploader()
    url = up.start(str(path), "a.wav")
    sneaked: list[bool] = []

    def behind_our_back(u: str, offset: int) -> None:
        if offset == CHUNK and not sneaked:  # another writer sends the next chunk meanwhile
            sneaked.append(True)
            with open(path, "rb") as f:
                f.seek(offset)
                env.store.append("alice", upload_id(u), offset, f, CHUNK)

    outcome = up.resume(url, str(path), behind_our_back)
    assert outcome.complete and outcome.sha256 == hashlib.sha256(data).hexdigest()
    assert env.store.head("alice", upload_id(url)).stored == SIZE


def test_abandon_terminates_and_a_second_abandon_is_fine(env: Env) -> None:
    path = env.audio()
    up = env.uploader()
    url = up.start(str(path), "a.wav")
    up.abandon(url)
    with pytest.raises(UploadGone):
        up.offset(url, SIZE)
    up.abandon(url)


def test_progress_counts_bytes_up_to_the_file_size(env: Env) -> None:
    path = env.audio()
    seen: list[tuple[int, int]] = []
    up = env.uploader(progress=lambda done, total: seen.append((done, total)))
    url = up.start(str(path), "a.wav")
    up.resume(url, str(path))
    assert seen[0] == (0, SIZE) and seen[-1] == (SIZE, SIZE)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))


def test_a_wrong_token_is_auth_refused(env: Env) -> None:
    path = env.audio()
    with pytest.raises(AuthRefused):
        env.uploader(token="tok-wrong").start(str(path), "a.wav")


def test_another_users_upload_is_gone_for_them(env: Env) -> None:
    path = env.audio()
    url = env.uploader().start(str(path), "a.wav")
    with pytest.raises(UploadGone):
        env.uploader(token="tok-bob").resume(url, str(path))


def test_a_server_that_is_not_there_is_offline(env: Env) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        with contextlib.closing(Remote(f"http://127.0.0.1:{port}/api/v1", timeout=5)) as remote:
            up = Uploader(remote, CHUNK)
            with pytest.raises(Offline):
                up.probe()


def _answering(status: str, headers: list[tuple[str, str]]) -> Callable[..., list[bytes]]:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response(status, [("Content-Type", "application/json"), *headers])
        return [b'{"error": "busy"}']

    return app


@pytest.mark.parametrize(
    ("status", "headers", "kind"),
    [
        ("503 Service Unavailable", [("Retry-After", "7")], BackOff),
        ("429 Too Many Requests", [("Retry-After", "7")], BackOff),
        ("500 Internal Server Error", [], Transient),
        ("423 Locked", [], Transient),
        ("413 Content Too Large", [], Permanent),
        ("401 Unauthorized", [], AuthRefused),
    ],
)
def test_server_answers_map_to_the_agents_error_kinds(
    tmp_path: Path, status: str, headers: list[tuple[str, str]], kind: type[Exception]
) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(b"x" * 1000)
    server, thread = run_server(_answering(status, headers))
    try:
        with contextlib.closing(
            Remote(f"http://127.0.0.1:{server.server_address[1]}/api/v1", timeout=5)
        ) as remote:
            base = remote.api_base + "/uploads"
            up = Uploader(remote, chunk_bytes=CHUNK)
            with pytest.raises(kind) as raised:
                up.start(str(path), "a.wav")
            assert not isinstance(raised.value, UploadGone)
            if kind is BackOff:
                assert raised.value.retry_after == 7  # type: ignore[attr-defined]
            with pytest.raises(kind):
                up.resume(base + "/" + "a" * 32, str(path))
    finally:
        stop_server(server, thread)
