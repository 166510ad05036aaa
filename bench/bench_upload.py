"""Benchmark of resumable uploads (jobsyncd.upload against the reference server) on loopback.

In one run, interleaved (the machine is shared: load changes between runs): a 64 MiB upload by
tus (default 4 MiB chunks, then the job created naming it, as the agent does) against ONE
multipart POST of the same file to the same server's job API (what the agent sends without
tus); the headline is their throughput ratio (target >= 0.8), best of N and per run. One plain
POST of the bytes to a trivial endpoint of the same process is context (no multipart, no job).
Then the same upload cut at 90% and resumed, bytes sent towards the server in total (target <=
the file + one chunk; a plain POST sends 1.9x); peak memory of the client and of the server, each
its own process, during a 256 MiB upload (target < 64 MiB each), and of the server receiving
256 MiB in one PATCH streamed from a generator. Run: python bench/bench_upload.py [--quick]
[--runs N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import stop_process

MiB = 1 << 20
HERE = Path(__file__).resolve()


# -- the server process -------------------------------------------------------------------------


def serve(audio_dir: str) -> None:
    """The reference server's app (job API and tus uploads) in its HTTP/1.1 runner, plus a
    trivial streaming POST endpoint (/plain); /peak answers this process's peak RSS and CPU."""
    from jobsyncd.server.app import create_app
    from jobsyncd.server.cli import WSGIServer

    jobs_app = create_app(
        db_path=os.path.join(audio_dir, "jobs.sqlite3"),
        audio_dir=audio_dir,
        max_upload_bytes=1 << 30,
    )

    def plain(environ: dict[str, Any]) -> bytes:
        # What the multipart path does with a part: stream to a file, sha256, fsync.
        left = int(environ.get("CONTENT_LENGTH") or 0)
        digest = hashlib.sha256()
        with open(os.path.join(audio_dir, "plain.bin"), "wb") as f:
            while left > 0:
                data = environ["wsgi.input"].read(min(256 << 10, left))
                if not data:
                    break
                left -= len(data)
                digest.update(data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return json.dumps({"sha256": digest.hexdigest()}).encode()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        if path.startswith("/api/v1/"):
            return jobs_app(environ, start_response)
        if path == "/plain":
            body = plain(environ)
        else:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu = usage.ru_utime + usage.ru_stime
            body = json.dumps({"peak_mib": _peak_mib(), "cpu": cpu}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    server = WSGIServer(("127.0.0.1", 0), app)
    print(f"port {server.server_address[1]}", flush=True)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the runner logs a line per request
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.2)


class ServerProcess:
    def __init__(self, workdir: Path) -> None:
        audio = workdir / "audio"
        audio.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "--serve", str(audio)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            raise SystemExit("the bench server did not start")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def usage(self) -> dict[str, float]:
        import requests

        return requests.get(self.url + "/peak", timeout=30).json()

    def peak_mib(self) -> float:
        return float(self.usage()["peak_mib"])

    def stop(self) -> None:
        stop_process(self.proc)


# -- the client process -------------------------------------------------------------------------


def client(mode: str, base: str, path: str, chunk: int, stop_at: int) -> None:
    """One upload in this process; prints seconds, the outcome and this process's peak RSS."""
    import uuid

    import requests

    from jobsyncd.remote import Remote, RemoteError
    from jobsyncd.upload import Uploader

    session = requests.Session()
    session.trust_env = False
    result: dict[str, Any] = {}
    remote = Remote(base + "/api/v1", timeout=60)
    cpu_before = _cpu()
    start = time.perf_counter()
    if mode == "multipart":
        job = remote.create(str(uuid.uuid4()), "bench", {}, path)  # as the agent does today
        result["sha256"] = (job.audio or {}).get("sha256")
    elif mode == "plain":
        with open(path, "rb") as f:
            try:
                answer = session.post(base + "/plain", data=f, timeout=60)
                result["sha256"] = answer.json()["sha256"]
            except requests.RequestException as exc:
                result["error"] = type(exc).__name__
    else:
        up = Uploader(remote, chunk_bytes=chunk)
        url = os.environ.get("BENCH_UPLOAD_URL") or up.start(path, "bench.wav")
        result["url"] = url
        should_stop = (lambda: False) if stop_at <= 0 else None
        try:
            new = not os.environ.get("BENCH_UPLOAD_URL")  # as the agent: no HEAD after start
            outcome = up.resume(url, path, should_stop=should_stop, new=new)
            result.update(offset=outcome.offset, sha256=outcome.sha256)
            # The job naming the finished upload, as the agent sends it: the server's sha256
            # of what it stored must be the file's.
            upload = (url.rsplit("/", 1)[1], "bench.wav")
            job = remote.create(str(uuid.uuid4()), "bench", {}, None, upload=upload)
            if (job.audio or {}).get("sha256") != outcome.sha256:
                result["error"] = f"the server's sha256 differs: {job.audio}"
        except RemoteError as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
    result["seconds"] = time.perf_counter() - start
    result["cpu"] = _cpu() - cpu_before
    result["peak_mib"] = _peak_mib()
    print(json.dumps(result), flush=True)


def _peak_mib() -> float:
    """This process's own peak RSS. Not ru_maxrss: Linux carries the parent's resident size at
    fork over an exec into it, so a child started by a 40 MiB parent reports at least 40 MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_client(
    mode: str, base: str, path: Path, chunk: int = 4 * MiB, url: str | None = None
) -> dict[str, Any]:
    env = dict(os.environ)
    if url:
        env["BENCH_UPLOAD_URL"] = url
    out = subprocess.run(
        [sys.executable, str(HERE), "--client", mode, base, str(path), str(chunk), "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"client {mode} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- a proxy that counts bytes and cuts once ------------------------------------------------------


class CountingProxy:
    """Forwards to the server; counts bytes towards it; closes the connection carrying byte
    `cut_at` of the client's stream (once)."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.sent = 0
        self.cut_at: int | None = None
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            u = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 18)
                if not data:
                    break
                if up:
                    with self._lock:
                        if self.cut_at is not None and self.sent + len(data) > self.cut_at:
                            keep = self.cut_at - self.sent
                            self.cut_at = None
                            self.sent += keep
                            dst.sendall(data[:keep])
                            break
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


# -- the measurements ---------------------------------------------------------------------------


def make_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(8 * MiB, left)
            f.write(os.urandom(n))
            left -= n
    return path


MODES = [("multipart", 0), ("tus", 4 * MiB), ("tus", 16 * MiB), ("plain", 0)]
HEADLINE = "multipart POST"


def _label(mode: str, chunk: int) -> str:
    return f"{mode} {chunk // MiB} MiB chunks" if chunk else f"{mode} POST"


def throughput(work: Path, size: int, runs: int) -> None:
    path = make_file(work / "in64.bin", size)
    server = ServerProcess(work)
    try:
        run_client("multipart", server.url, path)  # warm the page cache and the server
        run_client("tus", server.url, path)
        times: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}
        for _ in range(runs):  # interleaved: the machine is shared, load changes
            for mode, chunk in MODES:
                label = _label(mode, chunk)
                server_cpu = server.usage()["cpu"]
                r = run_client(mode, server.url, path, chunk or 4 * MiB)
                assert r.get("offset", size) == size and "error" not in r, r
                times.setdefault(label, []).append(r["seconds"])
                cpus.setdefault(label, []).append(r["cpu"] + server.usage()["cpu"] - server_cpu)
    finally:
        server.stop()
    best = {label: min(values) for label, values in times.items()}
    print(
        f"{size // MiB} MiB over loopback, {runs} runs interleaved (wall in the client; CPU of "
        "both processes):"
    )
    for label, seconds in best.items():
        each = " ".join(f"{t:.3f}" for t in times[label])
        print(
            f"  {label:20s} best {seconds:6.3f} s {size / MiB / seconds:6.1f} MiB/s"
            f"   CPU {min(cpus[label]):5.3f} s   runs: {each}"
        )
    print(f"  tus (upload + the job naming it) / one {HEADLINE} of the same file (target >= 0.8):")
    for label, seconds in best.items():
        if label.startswith("tus"):
            per_run = [m / t for m, t in zip(times[HEADLINE], times[label], strict=True)]
            print(
                f"    {label:18s} best-of ratio {best[HEADLINE] / seconds:4.2f}; per run "
                + " ".join(f"{r:4.2f}" for r in per_run)
                + f" (median {statistics.median(per_run):4.2f})"
            )
    print(
        "  context, one plain POST of the bytes (no multipart, no job): tus 4 MiB / plain "
        f"{best['plain POST'] / best['tus 4 MiB chunks']:4.2f}"
    )


def cut_and_resume(work: Path, size: int) -> None:
    path = make_file(work / "in64c.bin", size)
    chunk = 4 * MiB
    server = ServerProcess(work)
    proxy = CountingProxy(server.port)
    try:
        proxy.cut_at = int(size * 0.9)
        first = run_client("tus", proxy.url, path, chunk)
        second = run_client("tus", proxy.url, path, chunk, url=first["url"])
        assert second.get("offset") == size, second
        tus_total = proxy.sent
        proxy.sent = 0
        proxy.cut_at = int(size * 0.9)
        run_client("plain", proxy.url, path)
        run_client("plain", proxy.url, path)
        plain_total = proxy.sent
    finally:
        proxy.close()
        server.stop()
    print(f"{size // MiB} MiB cut at 90%, then sent again / resumed (bytes towards the server):")
    print(
        f"  tus             {tus_total / size:5.3f} x the file  (target <= {1 + chunk / size:.3f})"
    )
    print(f"  plain POST      {plain_total / size:5.3f} x the file")
    print(f"  first attempt: {first.get('error', 'no error')}")


def memory(work: Path, size: int) -> None:
    path = make_file(work / "in256.bin", size)
    server = ServerProcess(work)
    try:
        base = server.peak_mib()
        r = run_client("tus", server.url, path)
        assert r.get("offset") == size, r
        after = server.peak_mib()
        today = run_client("multipart", server.url, path)
    finally:
        server.stop()
    print(f"peak RSS during a {size // MiB} MiB tus upload (4 MiB chunks), each its own process:")
    print(f"  client          {r['peak_mib']:6.1f} MiB  (target < 64)")
    print(f"  server          {after:6.1f} MiB  (at start {base:.1f} MiB; target < 64)")
    print(f"  upload          {r['seconds']:6.2f} s, {size / MiB / r['seconds']:.0f} MiB/s")
    print(f"  client of a multipart POST (streamed), same file: {today['peak_mib']:.1f} MiB")
    one_patch(work, size)


def one_patch(work: Path, size: int) -> None:
    """The server receiving the whole file in one PATCH, chunked, from a generator."""
    import requests

    server = ServerProcess(work)
    try:
        session = requests.Session()
        session.trust_env = False
        tus = {"Tus-Resumable": "1.0.0"}
        created = session.post(
            server.url + "/api/v1/uploads", headers={**tus, "Upload-Length": str(size)}
        )
        url = server.url + created.headers["Location"]

        def generate() -> Any:
            block = os.urandom(MiB)
            for _ in range(size // MiB):
                yield block

        started = time.perf_counter()
        answer = session.patch(
            url,
            data=generate(),
            headers={
                **tus,
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": "0",
            },
            timeout=600,
        )
        seconds = time.perf_counter() - started
        assert answer.status_code == 204, (answer.status_code, answer.text)
        assert answer.headers["Upload-Offset"] == str(size)
        peak = server.peak_mib()
    finally:
        server.stop()
    print(
        f"  server, one {size // MiB} MiB PATCH from a generator (chunked): {peak:.1f} MiB, "
        f"{seconds:.2f} s"
    )


def consume_cost(work: Path, size: int) -> None:
    """consume()'s whole-file sha256: from the running hash vs read back from disk."""
    from jobsyncd.server.uploads import UploadStore

    path = make_file(work / "in-consume.bin", size)
    store = UploadStore(work / "consume", size)
    timings = {}
    for label in ("running hash (same process)", "read back (another worker)"):
        info = store.create("u", size)
        with open(path, "rb") as f:
            store.append("u", info.id, 0, f, size)
        taker = store if label.startswith("running") else UploadStore(work / "consume", size)
        started = time.perf_counter()
        taker.consume("u", info.id).path.unlink()
        timings[label] = time.perf_counter() - started
    print(f"consume() of a {size // MiB} MiB upload:")
    for label, seconds in timings.items():
        print(f"  {label:28s} {seconds * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller files, one run")
    parser.add_argument("--runs", type=int, default=5, help="throughput runs (5)")
    parser.add_argument("--serve")
    parser.add_argument("--client", nargs=5)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.client:
        mode, base, path, chunk, stop_at = args.client
        client(mode, base, path, int(chunk), int(stop_at))
        return
    sys.path.insert(0, str(HERE.parent.parent))
    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    try:
        small, big = (16 * MiB, 64 * MiB) if args.quick else (64 * MiB, 256 * MiB)
        throughput(work, small, 1 if args.quick else args.runs)
        cut_and_resume(work, small)
        memory(work, big)
        consume_cost(work, small)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
