"""Benchmark of the reference server (jobsyncd-server) against a do-nothing stdlib floor.

Measures in one run: keep-alive POSTs per second, a full listing of 100,000 jobs (every page at
the default limit), the time of a 304 answer, and the same number of POSTs against a minimal
stdlib HTTP/1.1 server (TCP_NODELAY, no work) as the floor. Run: python bench/bench_server.py
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

FLOOR_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = b'{"id":"x"}'
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args):
        sys.stderr.write("floor request\n")  # the same per-request logging cost as the server

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"listening on http://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
server.serve_forever()
"""


def server_command() -> list[str]:
    script = shutil.which("jobsyncd-server") or str(Path(sys.executable).parent / "jobsyncd-server")
    return [script]


def start(command: list[str], log: Path, cwd: Path) -> tuple[subprocess.Popen[bytes], str]:
    with open(log, "wb") as err:
        process = subprocess.Popen(command, stderr=err, stdout=subprocess.DEVNULL, cwd=cwd)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        if match:
            return process, match.group(1)
        if process.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()}")
        time.sleep(0.02)
    process.kill()
    raise SystemExit("server did not start")


def seed(db: Path, count: int) -> None:
    """Write `count` jobs straight into a fresh database, as the server would have stored them."""
    from jobsyncd.server.storage import Storage, utc_now

    Storage(db).close()
    conn = sqlite3.connect(db)
    now = utc_now()
    with conn:
        conn.executemany(
            "INSERT INTO jobs (id, user, local_id, text, metadata, status, created_at, updated_at)"
            " VALUES (?, 'default', ?, ?, ?, 'submitted', ?, ?)",
            (
                (str(uuid.uuid4()), str(uuid.uuid4()), f"job {i}", f'{{"n":{i}}}', now, now)
                for i in range(count)
            ),
        )
        conn.execute("INSERT INTO collections (user, version) VALUES ('default', 1)")
    conn.close()


def post_rate(session: requests.Session, url: str, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        answer = session.post(
            url,
            json={"local_id": str(uuid.uuid4()), "text": f"bench {i}", "metadata": {"i": i}},
        )
        if answer.status_code != 201:
            raise SystemExit(f"POST answered {answer.status_code}: {answer.text}")
    return count / (time.perf_counter() - started)


def full_listing(session: requests.Session, url: str) -> tuple[int, int, float]:
    started = time.perf_counter()
    jobs = pages = 0
    cursor = None
    while True:
        answer = session.get(url, params={"cursor": cursor} if cursor else None)
        answer.raise_for_status()
        page = answer.json()
        jobs += len(page["jobs"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return jobs, pages, time.perf_counter() - started


def median_304(session: requests.Session, url: str, rounds: int) -> float:
    etag = session.get(url, params={"limit": 1}).headers["ETag"]
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        answer = session.get(url, headers={"If-None-Match": etag})
        times.append(time.perf_counter() - started)
        if answer.status_code != 304:
            raise SystemExit(f"expected 304, got {answer.status_code}")
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--rounds-304", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jobsyncd-bench-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        db = work / "jobs.sqlite3"
        seed(db, args.jobs)
        server, base = start(
            [*server_command(), "--port", "0", "--db", str(db), "--audio-dir", str(work / "audio")],
            work / "server.log",
            work,
        )
        processes.append(server)
        floor, floor_base = start([sys.executable, "-c", FLOOR_SERVER], work / "floor.log", work)
        processes.append(floor)
        jobs_url = f"{base}/api/v1/jobs"

        with requests.Session() as session:
            listed, pages, listing_s = full_listing(session, jobs_url)
            t304 = median_304(session, jobs_url, args.rounds_304)
        # Alternate rounds against the server and the floor, so that a passing load on the
        # machine weighs on both figures alike.
        server_time = floor_time = 0.0
        rounds = 3
        per_round = args.posts // rounds
        with requests.Session() as server_session, requests.Session() as floor_session:
            server_session.post(jobs_url, json={"local_id": str(uuid.uuid4())})  # warm up
            floor_session.post(f"{floor_base}/x", json={})
            for _ in range(rounds):
                server_time += per_round / post_rate(server_session, jobs_url, per_round)
                floor_time += per_round / post_rate(floor_session, f"{floor_base}/x", per_round)
        server_rate = per_round * rounds / server_time
        floor_rate = per_round * rounds / floor_time
        if listed != args.jobs:
            raise SystemExit(f"listing gave {listed} jobs, expected {args.jobs}")

        ratio = server_rate / floor_rate
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
        print(f"POST (keep-alive, {args.posts} requests): {server_rate:8.0f} req/s")
        print(f"floor (stdlib no-op server, same load):   {floor_rate:8.0f} req/s")
        print(f"POST rate / floor rate: {ratio:.2f}  (target >= 0.50)")
        print(f"full listing of {listed} jobs in {pages} pages: {listing_s:.2f} s  (target < 3 s)")
        print(f"304 answer, median of {args.rounds_304}: {t304 * 1000:.2f} ms  (target < 5 ms)")
        ok = ratio >= 0.5 and listing_s < 3 and t304 < 0.005
        print("all targets met" if ok else "TARGET MISSED")
        return 0 if ok else 1
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
