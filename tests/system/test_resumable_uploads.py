"""The agent's resumable audio uploads (contract 6.8) against the real reference server: audio
larger than `upload_chunk_bytes` goes up by tus and is attached to the job; a `jobsyncd sync`
SIGKILLed mid-upload resumes where the server stands and never sends a confirmed byte again;
`update --audio` during an upload abandons it; a server without tus gets multipart.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import poll

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
