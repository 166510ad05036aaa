"""The agent's resumable audio uploads (contract 6.8) against the real reference server: audio
larger than `upload_chunk_bytes` goes up by tus and is attached to the job; a `jobsyncd sync`
SIGKILLed mid-upload resumes where the server stands and never sends a confirmed byte again;
`update --audio` during an upload abandons it; a server without tus (the fault server, or the
reference server behind a proxy of ours that switches its uploads off) gets multipart, also
one that stops offering them in the middle of an upload; an upload the server no longer has
(404 after its expiry sweep, 410) starts again, and the audio arrives whole.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import poll

from jobsyncd.server.uploads import SUBDIR, UploadStore

pytestmark = pytest.mark.timeout(120)

CHUNK = 65536


class CountingProxy:
    """Forwards 127.0.0.1 TCP to the server, counting the bytes sent towards it, optionally
    throttled (so that a kill lands in the middle of an upload)."""

    def __init__(self, port: int, delay_per_block: float = 0.0) -> None:
        self.target = ("127.0.0.1", port)
        self.delay = delay_per_block
        self.upstream_bytes = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while not self.stop.is_set():
                data = src.recv(16384)
                if not data:
                    break
                if counted:
                    with self.lock:
                        self.upstream_bytes += len(data)
                    if self.delay:
                        time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


class TusSwitch:
    """An HTTP/1.1 proxy of ours in front of the real reference server. It forwards every
    request, except that with `off` set, anything under /api/v1/uploads answers 404 (a server
    that does not, or no longer, offers resumable uploads), and an upload id in `gone` answers
    the status mapped to it (404/410: expired or lost on the server). Bodies are read whole:
    test audio is small."""

    def __init__(self, port: int) -> None:
        self.off = False
        self.gone: dict[str, int] = {}
        switch = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
                pass

            def do_any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?", 1)[0]
                if path.startswith("/api/v1/uploads"):
                    status = 404 if switch.off else switch.gone.get(path.rsplit("/", 1)[1])
                    if status is not None:
                        self._answer(status, [], b'{"error": "no such upload"}')
                        return
                upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    skip = ("connection", "content-length", "date", "server", "transfer-encoding")
                    kept = [(k, v) for k, v in answer.getheaders() if k.lower() not in skip]
                    self._answer(answer.status, kept, data)
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: list, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if status not in (204, 304):
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD" and status not in (204, 304):
                    self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,))
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def agent(cli, ref_server):
    cli.env["JOBSYNCD_SERVER_URL"] = ref_server.url
    cli.env["JOBSYNCD_UPLOAD_CHUNK_BYTES"] = str(CHUNK)
    return cli


def audio(tmp_path: Path, size: int, name: str = "big.wav") -> tuple[Path, str]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def server_job(ref_server, local_id: str) -> dict | None:
    return next((j for j in ref_server.jobs() if j["local_id"] == local_id), None)


def last_record(cli, local_id: str) -> dict:
    lines = (cli.data_dir / "jobs.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if local_id in x][-1]


def uploads_offered(ref_server) -> bool:
    import requests

    return requests.options(ref_server.url + "/api/v1/uploads", timeout=5).status_code in (200, 204)


def test_large_audio_goes_up_resumably_and_is_attached_to_the_job(agent, ref_server, tmp_path):
    assert uploads_offered(ref_server)
    path, digest = audio(tmp_path, 5 * CHUNK + 123)
    lid = agent("create", "--text", "long dictation", "--audio", str(path), check=True).stdout.strip()
    agent("sync", check=True)
    job = server_job(ref_server, lid)
    assert job["audio"]["sha256"] == digest and job["audio"]["size"] == 5 * CHUNK + 123
    assert agent.json("show", lid)["sync_status"] == "synced"
    assert "upload_url" not in last_record(agent, lid)


def test_small_audio_and_a_zero_chunk_setting_keep_multipart(agent, ref_server, tmp_path):
    small, small_digest = audio(tmp_path, CHUNK // 2, "small.wav")
    lid = agent("create", "--audio", str(small), check=True).stdout.strip()
    agent.env["JOBSYNCD_UPLOAD_CHUNK_BYTES"] = "0"
    big, big_digest = audio(tmp_path, 3 * CHUNK, "big.wav")
    lid2 = agent("create", "--audio", str(big), check=True).stdout.strip()
    agent("sync", check=True)
    assert server_job(ref_server, lid)["audio"]["sha256"] == small_digest
    assert server_job(ref_server, lid2)["audio"]["sha256"] == big_digest


def test_a_sync_killed_mid_upload_resumes_and_sends_each_byte_once(agent, ref_server, tmp_path):
    assert uploads_offered(ref_server)
    size = 40 * CHUNK
    path, digest = audio(tmp_path, size)
    proxy = CountingProxy(ref_server.port, delay_per_block=0.01)
    try:
        agent.env["JOBSYNCD_SERVER_URL"] = proxy.url
        lid = agent("create", "--audio", str(path), check=True).stdout.strip()
        proc = agent.popen("sync", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            poll(
                lambda: last_record(agent, lid).get("upload_offset", 0) >= 10 * CHUNK,
                60,
                "a quarter of the upload confirmed",
            )
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(10)
        killed_at = last_record(agent, lid)["upload_offset"]
        assert 0 < killed_at < size
        in_progress = agent.json("status")["uploads_in_progress"]
        assert in_progress == [{"local_id": lid, "offset": killed_at}]
        proxy.delay = 0.0
        agent("sync", check=True)
        job = server_job(ref_server, lid)
        assert job["audio"]["sha256"] == digest
        # Every byte once: the file, plus at most the one chunk in flight at the kill, plus
        # the requests' headers.
        assert proxy.upstream_bytes <= size + CHUNK + 64 * 1024, proxy.upstream_bytes
    finally:
        proxy.close()


def test_update_audio_during_an_upload_abandons_it_and_sends_the_new_audio(
    agent, ref_server, tmp_path
):
    assert uploads_offered(ref_server)
    first, _ = audio(tmp_path, 40 * CHUNK, "first.wav")
    second, second_digest = audio(tmp_path, 3 * CHUNK, "second.wav")
    proxy = CountingProxy(ref_server.port, delay_per_block=0.01)
    try:
        agent.env["JOBSYNCD_SERVER_URL"] = proxy.url
        lid = agent("create", "--audio", str(first), check=True).stdout.strip()
        proc = agent.popen("sync", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            poll(
                lambda: last_record(agent, lid).get("upload_offset", 0) >= CHUNK,
                60,
                "the first upload under way",
            )
            agent("update", lid, "--audio", str(second), check=True)
            assert proc.wait(60) in (0, 1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        proxy.delay = 0.0
        agent("sync", check=True)
        assert server_job(ref_server, lid)["audio"]["sha256"] == second_digest
        assert agent.json("show", lid)["sync_status"] == "synced"
    finally:
        proxy.close()


def uploads_left(ref_server) -> list[str]:
    """The files of uploads in the server's store (partial, finished, or a crash's leftovers)."""
    root = ref_server.workdir / "server-audio" / SUBDIR
    return sorted(p.name for p in root.iterdir() if p.name != ".lock")


def sweep_a_day_later(ref_server) -> int:
    """The server's own expiry sweep, run as it would run 25 h from now (24 h expiry), on the
    running server's audio dir (the store is shared by processes through its locks)."""
    later = UploadStore(
        ref_server.workdir / "server-audio", 1 << 30, clock=lambda: time.time() + 25 * 3600
    )
    return later.expire()


def kill_mid_upload(agent, lid: str, proxy: CountingProxy, at: int) -> int:
    """Start `jobsyncd sync`, SIGKILL it once `at` bytes of the job's upload are confirmed;
    returns the offset recorded in the job's record."""
    proc = agent.popen("sync", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        poll(
            lambda: last_record(agent, lid).get("upload_offset", 0) >= at,
            60,
            f"{at} bytes of the upload confirmed",
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    return int(last_record(agent, lid)["upload_offset"])


@pytest.mark.parametrize("options_status", [404, 405, 501])
def test_large_audio_goes_by_multipart_to_a_server_without_resumable_uploads(
    cli, fault_server, tmp_path, options_status
):
    # The fault server has no tus: OPTIONS /api/v1/uploads answers 404 like any unknown path.
    # 501 (a server that does not know the method at all) is taken as "not offered" too.
    if options_status != 404:
        fault_server.add_fault("OPTIONS", r"/api/v1/uploads", times=None, status=options_status)
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    cli.env["JOBSYNCD_UPLOAD_CHUNK_BYTES"] = str(CHUNK)
    path, digest = audio(tmp_path, 3 * CHUNK + 7)
    lid = cli("create", "--audio", str(path), check=True).stdout.strip()
    cli("sync", check=True)
    job = fault_server.job_by_local_id(lid)
    assert hashlib.sha256(fault_server.audio_bytes(job["id"])).hexdigest() == digest
    assert job["audio"]["sha256"] == digest
    second, second_digest = audio(tmp_path, 2 * CHUNK + 1, "second.wav")
    lid2 = cli("create", "--audio", str(second), check=True).stdout.strip()
    cli("sync", check=True)
    assert fault_server.job_by_local_id(lid2)["audio"]["sha256"] == second_digest
    asked = [(m, p) for m, p, _ in fault_server.all_requests if p.startswith("/api/v1/uploads")]
    assert asked == [("OPTIONS", "/api/v1/uploads")]  # asked once, then again after a day


def test_audio_sent_by_multipart_is_streamed_from_the_file_never_held_in_memory(
    cli, fault_server, tmp_path
):
    # requests' `files=` read the whole recording into memory (and copied it): a 256 MiB file
    # took 540 MiB. The body is now read from the file as it is sent; the agent's peak memory
    # stays below the file's size, where a whole copy alone would pass it.
    import sys

    size = 60 << 20  # under the 64 MiB a server takes
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    path, digest = audio(tmp_path, size)
    lid = cli("create", "--audio", str(path), check=True).stdout.strip()
    peak = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", peak, cli.binary, "sync"],
        env=cli.env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    peak_kib = int(proc.stderr.splitlines()[-1])
    job = fault_server.job_by_local_id(lid)
    assert job["audio"]["sha256"] == digest
    assert hashlib.sha256(fault_server.audio_bytes(job["id"])).hexdigest() == digest
    assert peak_kib * 1024 < size, f"peak {peak_kib // 1024} MiB for a {size >> 20} MiB file"


def test_large_audio_goes_by_multipart_to_the_reference_server_with_uploads_switched_off(
    agent, ref_server, tmp_path
):
    switch = TusSwitch(ref_server.port)
    try:
        switch.off = True
        agent.env["JOBSYNCD_SERVER_URL"] = switch.url
        path, digest = audio(tmp_path, 3 * CHUNK + 7)
        lid = agent("create", "--audio", str(path), check=True).stdout.strip()
        agent("sync", check=True)
        assert server_job(ref_server, lid)["audio"]["sha256"] == digest
        assert uploads_left(ref_server) == []
    finally:
        switch.close()


def test_a_server_that_stops_offering_uploads_mid_upload_still_gets_the_whole_audio(
    agent, ref_server, tmp_path
):
    size = 40 * CHUNK
    path, digest = audio(tmp_path, size)
    switch = TusSwitch(ref_server.port)
    proxy = CountingProxy(switch.port, delay_per_block=0.01)
    try:
        agent.env["JOBSYNCD_SERVER_URL"] = proxy.url
        lid = agent("create", "--audio", str(path), check=True).stdout.strip()
        proc = agent.popen("sync", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            poll(
                lambda: last_record(agent, lid).get("upload_offset", 0) >= 4 * CHUNK,
                60,
                "the upload under way",
            )
            switch.off = True  # the next PATCH gets 404, and so does a new upload's POST
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 1, err  # an error for the job, retried by the next pass
        assert "Traceback" not in err
        assert agent.json("show", lid)["sync_status"] == "error"
        proxy.delay = 0.0
        agent("sync", check=True)  # OPTIONS now answers 404: multipart
        assert server_job(ref_server, lid)["audio"]["sha256"] == digest
        assert agent.json("show", lid)["sync_status"] == "synced"
        assert "upload_url" not in last_record(agent, lid)
    finally:
        proxy.close()
        switch.close()
    # The upload left half-done on the server goes with its expiry.
    assert len(uploads_left(ref_server)) == 2  # its data file and its sidecar
    assert sweep_a_day_later(ref_server) == 1
    assert uploads_left(ref_server) == []


@pytest.mark.parametrize("how", ["expired and swept (404)", "expired (410)"])
def test_an_upload_the_server_no_longer_has_starts_again_and_the_audio_arrives_whole(
    agent, ref_server, tmp_path, how
):
    size = 40 * CHUNK
    path, digest = audio(tmp_path, size)
    switch = TusSwitch(ref_server.port)
    proxy = CountingProxy(switch.port, delay_per_block=0.01)
    try:
        agent.env["JOBSYNCD_SERVER_URL"] = proxy.url
        lid = agent("create", "--audio", str(path), check=True).stdout.strip()
        assert 0 < kill_mid_upload(agent, lid, proxy, 4 * CHUNK) < size
        old_id = last_record(agent, lid)["upload_url"].rsplit("/", 1)[1]
        if how.endswith("(404)"):
            assert sweep_a_day_later(ref_server) == 1  # the server's own sweep removes it
        else:
            switch.gone[old_id] = 410
        proxy.delay = 0.0
        before = proxy.upstream_bytes
        agent("sync", check=True)
        assert proxy.upstream_bytes - before >= size  # started again from zero
        assert server_job(ref_server, lid)["audio"]["sha256"] == digest
        assert "upload_url" not in last_record(agent, lid)
    finally:
        proxy.close()
        switch.close()
    sweep_a_day_later(ref_server)
    assert uploads_left(ref_server) == []
