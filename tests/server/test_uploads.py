"""The tus 1.0.0 upload handler (jobsyncd.server.uploads) over real HTTP on 127.0.0.1.

`handle` runs behind a threaded wsgiref server with a trivial auth shim (a bearer token names a
user); requests are real ones, and connections cut mid-body are real sockets closed early.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import socketserver
import threading
import wsgiref.simple_server
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import poll

from jobsyncd.server.uploads import SUBDIR, UploadError, UploadStore, handle

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
MAX_BYTES = 1 << 20
TUS = {"Tus-Resumable": "1.0.0"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class TusServer:
    url: str  # the creation URL
    port: int
    store: UploadStore
    clock: FakeClock
    audio_dir: Path

    def session(self, token: str = "tok-alice") -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.headers.update({"Authorization": f"Bearer {token}", **TUS})
        return s


def serve(store: UploadStore) -> tuple[wsgiref.simple_server.WSGIServer, threading.Thread]:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        user = TOKENS.get(auth[7:]) if auth.startswith("Bearer ") else None
        return handle(environ, start_response, user, store)

    httpd = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    return httpd, thread


@pytest.fixture
def tus(tmp_path: Path) -> Iterator[TusServer]:
    clock = FakeClock()
    audio_dir = tmp_path / "audio"
    store = UploadStore(audio_dir, MAX_BYTES, expiry_seconds=3600, clock=clock)
    httpd, thread = serve(store)
    port = httpd.server_address[1]
    try:
        yield TusServer(f"http://127.0.0.1:{port}/api/v1/uploads", port, store, clock, audio_dir)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def create(s: requests.Session, url: str, length: int, metadata: str = "") -> str:
    headers = {"Upload-Length": str(length)}
    if metadata:
        headers["Upload-Metadata"] = metadata
    r = s.post(url, headers=headers)
    assert r.status_code == 201, r.text
    return requests.compat.urljoin(url, r.headers["Location"])


def patch(
    s: requests.Session, url: str, offset: int, data: bytes, checksum: str | None = "sha256"
) -> requests.Response:
    headers = {"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
    if checksum:
        digest = hashlib.new(checksum, data).digest()
        headers["Upload-Checksum"] = f"{checksum} {base64.b64encode(digest).decode()}"
    return s.patch(url, data=data, headers=headers)


def head_offset(s: requests.Session, url: str) -> int:
    r = s.head(url)
    assert r.status_code == 200, r.status_code
    return int(r.headers["Upload-Offset"])


def cut_patch(
    port: int, url: str, offset: int, declared: int, sent: bytes, extra: str = ""
) -> None:
    """A PATCH whose connection closes after `sent` of `declared` body bytes."""
    path = url.split(str(port), 1)[1]
    head = (
        f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer tok-alice\r\n"
        f"Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
        f"Upload-Offset: {offset}\r\nContent-Length: {declared}\r\n{extra}\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode() + sent)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(4096)  # whatever it answers, if anything, once it has read to the end


def test_options_offers_tus_without_a_token(tus: TusServer) -> None:
    r = requests.options(tus.url)
    assert r.status_code == 204
    assert r.headers["Tus-Version"] == "1.0.0"
    assert set(r.headers["Tus-Extension"].split(",")) == {
        "creation",
        "checksum",
        "termination",
        "expiration",
    }
    assert r.headers["Tus-Checksum-Algorithm"] == "sha1,sha256"
    assert r.headers["Tus-Max-Size"] == str(MAX_BYTES)


def test_requests_other_than_options_need_a_user(tus: TusServer) -> None:
    r = requests.post(tus.url, headers={**TUS, "Upload-Length": "10"})
    assert r.status_code == 401
    assert r.json() == {"error": "missing or wrong token"}


def test_creation_answers_201_with_a_location_and_an_expiry(tus: TusServer) -> None:
    with tus.session() as s:
        meta = "filename " + base64.b64encode("dictée.wav".encode()).decode()
        r = s.post(tus.url, headers={"Upload-Length": "100", "Upload-Metadata": meta})
        assert r.status_code == 201
        assert r.headers["Location"].startswith("/api/v1/uploads/")
        assert r.headers["Tus-Resumable"] == "1.0.0"
        assert "GMT" in r.headers["Upload-Expires"]
        url = requests.compat.urljoin(tus.url, r.headers["Location"])
        h = s.head(url)
        assert h.status_code == 200
        assert h.headers["Upload-Offset"] == "0"
        assert h.headers["Upload-Length"] == "100"
        assert h.headers["Upload-Metadata"] == meta
        assert h.headers["Cache-Control"] == "no-store"
        upload_id = url.rsplit("/", 1)[1]
        assert tus.store.head("alice", upload_id).filename == "dictée.wav"


def test_a_whole_upload_in_chunks_is_consumed_with_its_size_and_sha256(tus: TusServer) -> None:
    data = os.urandom(300_000)
    with tus.session() as s:
        url = create(s, tus.url, len(data))
        for start in range(0, len(data), 100_000):
            r = patch(s, url, start, data[start : start + 100_000])
            assert r.status_code == 204, r.text
            assert r.headers["Upload-Offset"] == str(start + 100_000)
    upload_id = url.rsplit("/", 1)[1]
    consumed = tus.store.consume("alice", upload_id)
    assert consumed.path.parent == tus.audio_dir
    assert consumed.path.read_bytes() == data
    assert (consumed.size, consumed.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    with pytest.raises(UploadError) as gone:
        tus.store.head("alice", upload_id)
    assert gone.value.status == 404


def test_sha256_of_a_consumed_upload_is_right_when_another_process_received_it(
    tus: TusServer,
) -> None:
    data = os.urandom(200_000)
    with tus.session() as s:
        url = create(s, tus.url, len(data))
        assert patch(s, url, 0, data[:50_000]).status_code == 204
        assert patch(s, url, 50_000, data[50_000:]).status_code == 204
    other_worker = UploadStore(tus.audio_dir, MAX_BYTES, clock=tus.clock)
    consumed = other_worker.consume("alice", url.rsplit("/", 1)[1])
    assert consumed.sha256 == hashlib.sha256(data).hexdigest()


def test_a_cut_chunk_without_checksum_keeps_what_arrived_and_the_rest_resumes(
    tus: TusServer,
) -> None:
    data = os.urandom(200_000)
    with tus.session() as s:
        url = create(s, tus.url, len(data))
        cut_patch(tus.port, url, 0, len(data), data[:80_000])
        offset = head_offset(s, url)
        assert offset == 80_000  # "store as much of the received data as possible"
        assert patch(s, url, offset, data[offset:]).status_code == 204
    consumed = tus.store.consume("alice", url.rsplit("/", 1)[1])
    assert consumed.path.read_bytes() == data


def test_a_cut_chunk_with_a_checksum_stores_nothing_of_it(tus: TusServer) -> None:
    data = os.urandom(200_000)
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    with tus.session() as s:
        url = create(s, tus.url, len(data))
        cut_patch(
            tus.port, url, 0, len(data), data[:80_000], f"Upload-Checksum: sha256 {digest}\r\n"
        )
        assert head_offset(s, url) == 0
        assert patch(s, url, 0, data).status_code == 204
    info = tus.store.head("alice", url.rsplit("/", 1)[1])
    assert (info.offset, info.received) == (len(data), 80_000 + len(data))


def test_a_patch_at_the_wrong_offset_is_409_and_changes_nothing(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 100)
        assert patch(s, url, 0, b"a" * 40).status_code == 204
        r = patch(s, url, 10, b"b" * 40)
        assert r.status_code == 409
        assert "offset" in r.json()["error"]
        assert head_offset(s, url) == 40
        assert patch(s, url, 40, b"c" * 60).status_code == 204
    consumed = tus.store.consume("alice", url.rsplit("/", 1)[1])
    assert consumed.path.read_bytes() == b"a" * 40 + b"c" * 60


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_a_checksum_mismatch_is_460_and_nothing_of_the_chunk_is_stored(
    tus: TusServer, algorithm: str
) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 100)
        assert patch(s, url, 0, b"a" * 50, algorithm).status_code == 204
        wrong = base64.b64encode(hashlib.new(algorithm, b"x").digest()).decode()
        r = s.patch(
            url,
            data=b"b" * 50,
            headers={
                "Upload-Offset": "50",
                "Content-Type": "application/offset+octet-stream",
                "Upload-Checksum": f"{algorithm} {wrong}",
            },
        )
        assert r.status_code == 460
        assert r.reason == "Checksum Mismatch"
        assert "checksum" in r.json()["error"]
        assert head_offset(s, url) == 50
    upload_id = url.rsplit("/", 1)[1]
    assert (tus.audio_dir / SUBDIR / upload_id).stat().st_size == 50


def test_a_sha256_mismatch_in_the_first_chunk_is_460_and_the_final_sha256_stays_right(
    tus: TusServer,
) -> None:
    # From offset 0 the server checks the chunk against its running sha256 of the upload.
    data = os.urandom(3000)
    with tus.session() as s:
        url = create(s, tus.url, len(data))
        wrong = base64.b64encode(hashlib.sha256(data[:1000]).digest()).decode()
        r = s.patch(
            url,
            data=b"x" + data[1:1000],
            headers={
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
                "Upload-Checksum": f"sha256 {wrong}",
            },
        )
        assert r.status_code == 460
        assert head_offset(s, url) == 0
        assert patch(s, url, 0, data[:1000]).status_code == 204
        assert patch(s, url, 1000, data[1000:]).status_code == 204
    consumed = tus.store.consume("alice", url.rsplit("/", 1)[1])
    assert consumed.sha256 == hashlib.sha256(data).hexdigest()
    assert consumed.path.read_bytes() == data


def test_an_unknown_checksum_algorithm_is_400(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 10)
        r = s.patch(
            url,
            data=b"0123456789",
            headers={
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
                "Upload-Checksum": "md5 " + base64.b64encode(b"0" * 16).decode(),
            },
        )
        assert r.status_code == 400
        assert head_offset(s, url) == 0


def test_an_upload_over_the_servers_limit_is_413_at_creation(tus: TusServer) -> None:
    with tus.session() as s:
        r = s.post(tus.url, headers={"Upload-Length": str(MAX_BYTES + 1)})
        assert r.status_code == 413
        assert "limit" in r.json()["error"]
        assert s.post(tus.url, headers={"Upload-Length": str(MAX_BYTES)}).status_code == 201


def test_a_chunk_past_the_upload_length_is_413_and_not_stored(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 10)
        assert patch(s, url, 0, b"x" * 11, None).status_code == 413
        assert head_offset(s, url) == 0


def test_patch_without_the_offset_content_type_is_415(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 10)
        r = s.patch(url, data=b"x" * 10, headers={"Upload-Offset": "0"})
        assert r.status_code == 415
        assert head_offset(s, url) == 0


def test_a_sidecar_update_cut_by_a_crash_leaves_the_previous_offset_and_the_upload_goes_on(
    tus: TusServer,
) -> None:
    data = os.urandom(3000)
    with tus.session() as s:
        url = create(s, tus.url, len(data))
        assert patch(s, url, 0, data[:1000]).status_code == 204
        assert patch(s, url, 1000, data[1000:2000]).status_code == 204
        sidecar = tus.audio_dir / SUBDIR / (url.rsplit("/", 1)[1] + ".json")
        with open(sidecar, "r+b") as f:  # the last update was cut halfway: garbage in its slot
            f.seek(f.read().index(b'"offset":2000'))
            f.write(b"\0" * 40)
        assert head_offset(s, url) == 1000  # the older slot: data past it is not confirmed
        assert patch(s, url, 1000, data[1000:2000]).status_code == 204
        assert patch(s, url, 2000, data[2000:]).status_code == 204
    consumed = tus.store.consume("alice", url.rsplit("/", 1)[1])
    assert consumed.path.read_bytes() == data


def test_a_sidecar_of_one_json_record_from_before_the_slots_is_read_and_updated(
    tus: TusServer,
) -> None:
    data = os.urandom(2000)
    with tus.session() as s:
        url = create(s, tus.url, len(data))
        upload_id = url.rsplit("/", 1)[1]
        info = tus.store.head("alice", upload_id)
        (tus.audio_dir / SUBDIR / f"{upload_id}.json").write_text(
            json.dumps(dataclasses.asdict(info))
        )
        assert head_offset(s, url) == 0
        assert patch(s, url, 0, data[:1000]).status_code == 204
        assert patch(s, url, 1000, data[1000:]).status_code == 204
        assert head_offset(s, url) == 2000
    assert tus.store.consume("alice", upload_id).path.read_bytes() == data


def test_a_request_without_tus_resumable_is_412_and_not_processed(tus: TusServer) -> None:
    r = requests.post(tus.url, headers={"Authorization": "Bearer tok-alice", "Upload-Length": "10"})
    assert r.status_code == 412
    assert r.headers["Tus-Version"] == "1.0.0"
    assert not [p for p in (tus.audio_dir / SUBDIR).iterdir() if p.suffix == ".json"]


def test_termination_frees_the_upload_and_later_requests_get_404(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 100)
        assert patch(s, url, 0, b"a" * 50).status_code == 204
        assert s.delete(url).status_code == 204
        assert s.head(url).status_code == 404
        assert patch(s, url, 50, b"a" * 50).status_code == 404
        assert s.delete(url).status_code == 404
    assert sorted(p.name for p in (tus.audio_dir / SUBDIR).iterdir()) == [".lock"]


def test_an_expired_upload_is_gone_and_its_files_are_removed(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 100)
        assert patch(s, url, 0, b"a" * 50).status_code == 204
        tus.clock.now += 3599  # each chunk renews the expiry: still alive
        assert patch(s, url, 50, b"a" * 10).status_code == 204
        tus.clock.now += 3601
        assert s.head(url).status_code in (404, 410)  # tus 1.0.0, Expiration: either
        assert patch(s, url, 60, b"a" * 40).status_code in (404, 410)
    assert sorted(p.name for p in (tus.audio_dir / SUBDIR).iterdir()) == [".lock"]


def test_expire_purges_expired_uploads_and_crash_leftovers_only(tus: TusServer) -> None:
    with tus.session() as s:
        old = create(s, tus.url, 100)
        tus.clock.now += 1800
        young = create(s, tus.url, 100)
    orphan = tus.audio_dir / SUBDIR / ("ab" * 16)
    orphan.write_bytes(b"left by a crash between data file and sidecar")
    os.utime(orphan, (tus.clock.now - 7200, tus.clock.now - 7200))
    tus.clock.now += 1801
    assert tus.store.expire() == 1
    names = {p.name for p in (tus.audio_dir / SUBDIR).iterdir()}
    young_id, old_id = young.rsplit("/", 1)[1], old.rsplit("/", 1)[1]
    assert names == {".lock", young_id, f"{young_id}.json"}
    assert old_id not in names


def test_another_users_upload_is_404_for_every_method(tus: TusServer) -> None:
    with tus.session("tok-alice") as alice, tus.session("tok-bob") as bob:
        url = create(alice, tus.url, 100)
        assert bob.head(url).status_code == 404
        assert patch(bob, url, 0, b"a" * 100).status_code == 404
        assert bob.delete(url).status_code == 404
        assert head_offset(alice, url) == 0
    upload_id = url.rsplit("/", 1)[1]
    with pytest.raises(UploadError) as refused:
        tus.store.consume("bob", upload_id)
    assert refused.value.status == 404


def test_consuming_an_unfinished_upload_is_409_and_leaves_it(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 100)
        assert patch(s, url, 0, b"a" * 50).status_code == 204
    upload_id = url.rsplit("/", 1)[1]
    with pytest.raises(UploadError) as refused:
        tus.store.consume("alice", upload_id)
    assert refused.value.status == 409
    assert tus.store.head("alice", upload_id).offset == 50


def test_an_empty_upload_is_complete_at_creation(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 0)
    consumed = tus.store.consume("alice", url.rsplit("/", 1)[1])
    assert (consumed.size, consumed.sha256) == (0, hashlib.sha256(b"").hexdigest())


def test_a_second_writer_while_one_is_writing_gets_423(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 1000)
        path = url.split(str(tus.port), 1)[1]
        head = (
            f"PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-alice\r\n"
            "Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
            "Upload-Offset: 0\r\nContent-Length: 1000\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", tus.port), timeout=5) as slow:
            slow.sendall(head.encode() + b"s" * 10)
            data_file = tus.audio_dir / SUBDIR / url.rsplit("/", 1)[1]
            poll(lambda: _locked(data_file), what="the slow PATCH holds the upload")
            r = patch(s, url, 0, b"f" * 1000)
            assert r.status_code == 423
            slow.sendall(b"s" * 990)
            assert b"204" in slow.recv(4096).split(b"\r\n", 1)[0]
        assert head_offset(s, url) == 1000


def _locked(path: Path) -> bool:
    with open(path, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def test_unknown_paths_and_methods_are_json_errors(tus: TusServer) -> None:
    with tus.session() as s:
        assert s.head(tus.url + "/../../etc").status_code == 404
        r = s.get(tus.url)
        assert r.status_code == 405
        assert r.headers["Allow"] == "OPTIONS, POST"
        assert json.loads(r.text)["error"]
        assert s.head(tus.url + "/" + "0" * 32).status_code == 404


def test_upload_files_are_private_to_the_server(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 10)
    upload_id = url.rsplit("/", 1)[1]
    root = tus.audio_dir / SUBDIR
    assert root.stat().st_mode & 0o777 == 0o700
    for name in (upload_id, f"{upload_id}.json"):
        assert (root / name).stat().st_mode & 0o777 == 0o600


def test_an_expired_upload_not_yet_swept_answers_410(tus: TusServer) -> None:
    info = tus.store.create("alice", 10)
    tus.clock.now += 3600
    with pytest.raises(UploadError) as gone:
        tus.store.head("alice", info.id)
    assert gone.value.status == 410
    assert not (tus.audio_dir / SUBDIR / info.id).exists()


def test_a_chunked_patch_in_the_servers_own_runner_is_stored_whole(tmp_path: Path) -> None:
    from jobsyncd.server.cli import WSGIServer

    store = UploadStore(tmp_path / "audio", MAX_BYTES)
    server = WSGIServer(("127.0.0.1", 0), lambda e, s: handle(e, s, "alice", store))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/uploads"
        blocks = [os.urandom(100_000) for _ in range(5)]
        with requests.Session() as s:
            s.headers.update(TUS)
            upload = create(s, url, 500_000)
            r = s.patch(
                upload,
                data=iter(blocks),  # no Content-Length: Transfer-Encoding: chunked
                headers={"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
            )
            assert r.status_code == 204, r.text
            assert r.headers["Upload-Offset"] == "500000"
        consumed = store.consume("alice", upload.rsplit("/", 1)[1])
        assert consumed.path.read_bytes() == b"".join(blocks)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_x_http_method_override_is_honoured_on_a_post(tus: TusServer) -> None:
    with tus.session() as s:
        url = create(s, tus.url, 10)
        r = s.post(url, headers={"X-HTTP-Method-Override": "DELETE"})
        assert r.status_code == 204
        assert s.head(url).status_code == 404
