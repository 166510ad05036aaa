"""Benchmark of the reference server's change feed and its several-worker set-ups, in one run.

(a) load: N simulated agents (threads, each its own user) create, update and delete J jobs each
    while holding a long-poll on their feed, against the single-process server (SQLite) and
    gunicorn with 4 gthread workers on SQLite and on PostgreSQL: requests/s, p50/p99 latency,
    errors (must be 0), duplicates (must be 0), feed mismatches (must be 0);
(b) fan-out: 500 idle long-polls on one server; one change reaches all of them (p50/p99/max
    from the change's answer to each poll's answer; target p99 < 1 s), the server's memory;
(c) /changes after one change at 100,000 jobs: server time, against the full listing;
(d) POST /api/v1/batch of 500 creates (and of 500 updates).

PostgreSQL rows need JOBSYNCD_TEST_PG_URL (tests/pg_cluster.sh start DIR prints one); without
it they are skipped. Run: python bench/bench_feed.py [--agents 50] [--jobs 200]
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

BIN = Path(sys.executable).parent
PG_ENV = "JOBSYNCD_TEST_PG_URL"


# -- servers ----------------------------------------------------------------------------------


def _wait_for(log: Path, pattern: str, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match.group(1)
        if process.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise SystemExit("server did not start")


@contextmanager
def server(kind: str, work: Path, db: str, tokens: Path | None) -> Iterator[tuple[str, int, Path]]:
    """(base URL, pid, log) of a single-process server or of gunicorn -w 4 -k gthread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSYNCD_SERVER_")}
    env.update({"JOBSYNCD_SERVER_DB": db, "JOBSYNCD_SERVER_AUDIO_DIR": str(work / "audio")})
    if tokens:
        env["JOBSYNCD_SERVER_TOKEN_FILE"] = str(tokens)
    log = work / f"{kind}-{uuid.uuid4().hex[:6]}.log"
    if kind == "single":
        command = [str(BIN / "jobsyncd-server"), "--port", "0"]
        pattern = r"listening on (http://\S+)"
    else:
        command = [str(BIN / "gunicorn"), "-b", "127.0.0.1:0", "-w", "4", "-k", "gthread"]
        command += ["--threads", "150", "--timeout", "120", "jobsyncd.server:create_app()"]
        pattern = r"Listening at: (http://\S+)"
    with open(log, "wb") as err:
        process = subprocess.Popen(command, stderr=err, stdout=subprocess.DEVNULL, env=env)
    try:
        base = _wait_for(log, pattern, process)
        if kind != "single":
            time.sleep(1.0)  # the workers load the app after "Listening"
        yield base, process.pid, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (gunicorn's workers)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for one in pids:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def pg_database() -> str | None:
    admin = os.environ.get(PG_ENV)
    if not admin:
        return None
    import psycopg

    name = f"jbench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


# -- (a) load ---------------------------------------------------------------------------------


class Agent:
    """One simulated agent: its own user, a long-poll on its feed, and its job traffic."""

    def __init__(self, base: str, token: str, jobs: int) -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}
        self.jobs = jobs
        self.latencies: list[float] = []
        self.errors = 0
        self.duplicates = 0
        self.requests = 0
        self.feed: dict[str, dict[str, object]] = {}
        self.since = ""
        self.stop = threading.Event()

    def _call(self, session: requests.Session, method: str, url: str, **kw: object) -> object:
        started = time.perf_counter()
        try:
            answer = session.request(method, url, headers=self.headers, timeout=120, **kw)
        except requests.RequestException:
            self.errors += 1
            return None
        self.latencies.append(time.perf_counter() - started)
        self.requests += 1
        if answer.status_code >= 400:
            self.errors += 1
            return None
        return answer

    def work(self) -> None:
        jobs_url = f"{self.base}/api/v1/jobs"
        with requests.Session() as session:
            made: dict[str, str] = {}
            for i in range(self.jobs):
                local_id = str(uuid.uuid4())
                body = {"local_id": local_id, "text": f"job {i}", "metadata": {"i": i}}
                answer = self._call(session, "POST", jobs_url, json=body)
                if answer is not None:
                    made[local_id] = answer.json()["id"]  # type: ignore[attr-defined]
            for job_id in made.values():
                self._call(session, "PATCH", f"{jobs_url}/{job_id}", json={"text": "changed"})
            for job_id in made.values():
                self._call(session, "DELETE", f"{jobs_url}/{job_id}")
            listed = session.get(jobs_url, headers=self.headers, timeout=60).json()["jobs"]
            self.duplicates += len(listed)  # everything was deleted: whatever is left is extra

    def poll(self) -> None:
        url = f"{self.base}/api/v1/changes"
        with requests.Session() as session:
            while not self.stop.is_set():
                params = {"wait": "5", **({"since": self.since} if self.since else {})}
                try:
                    page = session.get(url, params=params, headers=self.headers, timeout=120)
                except requests.RequestException:
                    self.errors += 1
                    continue
                if page.status_code != 200:
                    self.errors += 1
                    continue
                self.apply(page.json())

    def apply(self, page: dict) -> None:
        for change in page["changes"]:
            if change.get("deleted"):
                self.feed.pop(change["id"], None)
            else:
                self.feed[change["id"]] = change
        self.since = page["next"]


def load(base: str, tokens: list[str], jobs: int) -> dict[str, float]:
    agents = [Agent(base, token, jobs) for token in tokens]
    pollers = [threading.Thread(target=a.poll, daemon=True) for a in agents]
    workers = [threading.Thread(target=a.work) for a in agents]
    for thread in pollers:
        thread.start()
    started = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - started
    for agent in agents:
        agent.stop.set()
    for thread in pollers:
        thread.join(timeout=30)
    mismatches = 0
    with requests.Session() as session:  # a last read of each feed: all jobs were deleted
        for agent in agents:
            params = {"since": agent.since} if agent.since else {}
            page = session.get(f"{base}/api/v1/changes", params=params, headers=agent.headers)
            agent.apply(page.json())
            mismatches += len(agent.feed)
    latencies = [x for a in agents for x in a.latencies]
    return {
        "requests": sum(a.requests for a in agents),
        "rate": sum(a.requests for a in agents) / elapsed,
        "p50": percentile(latencies, 0.5) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "errors": sum(a.errors for a in agents),
        "duplicates": sum(a.duplicates for a in agents),
        "mismatches": mismatches,
        "seconds": elapsed,
    }


# -- (b) fan-out ------------------------------------------------------------------------------


def fan_out(base: str, pid: int, polls: int) -> dict[str, float]:
    """Hold `polls` long-polls on raw sockets, make one change, time each answer."""
    with requests.Session() as session:
        start = session.get(f"{base}/api/v1/changes", params={"limit": 5000}).json()
        while start["more"]:
            start = session.get(f"{base}/api/v1/changes", params={"since": start["next"]}).json()
    host, port = urlsplit(base).hostname, urlsplit(base).port
    request = (
        f"GET /api/v1/changes?since={start['next']}&wait=60 HTTP/1.1\r\n"
        f"Host: {host}\r\nConnection: close\r\n\r\n"
    ).encode()
    selector = selectors.DefaultSelector()
    sockets = []
    for _ in range(polls):
        sock = socket.create_connection((host, port))
        sock.sendall(request)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, bytearray())
        sockets.append(sock)
    time.sleep(3.0)  # let every poll reach its wait
    memory = rss_mib(pid)
    with requests.Session() as session:
        session.post(f"{base}/api/v1/jobs", json={"local_id": str(uuid.uuid4())})
    changed = time.perf_counter()
    arrived: list[float] = []
    deadline = changed + 30
    while len(arrived) < polls and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=1.0):
            data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            if data:
                key.data.extend(data)
            if not data or key.data.endswith(b"}"):
                if b'"changes":[{' in key.data:
                    arrived.append(time.perf_counter() - changed)
                selector.unregister(key.fileobj)
    for sock in sockets:
        sock.close()
    return {
        "reached": len(arrived),
        "p50": percentile(arrived, 0.5) * 1000 if arrived else float("nan"),
        "p99": percentile(arrived, 0.99) * 1000 if arrived else float("nan"),
        "max": max(arrived) * 1000 if arrived else float("nan"),
        "rss": memory,
    }


# -- (c) one change at 100,000 jobs ------------------------------------------------------------


def seed_sqlite(db: Path, count: int) -> None:
    from jobsyncd.server.storage import SQLiteStorage, utc_now

    SQLiteStorage(db).close()
    conn = sqlite3.connect(db)
    now = utc_now()
    with conn:
        conn.executemany(
            "INSERT INTO jobs (id, user, local_id, text, metadata, status, created_at, "
            "updated_at, change_seq) VALUES (?, 'default', ?, ?, ?, 'submitted', ?, ?, ?)",
            (
                (str(uuid.uuid4()), str(uuid.uuid4()), f"job {i}", f'{{"n":{i}}}', now, now, i + 1)
                for i in range(count)
            ),
        )
        conn.execute("INSERT INTO collections (user, version) VALUES ('default', ?)", (count,))
    conn.close()


def seed_postgres(url: str, count: int) -> None:
    import psycopg

    from jobsyncd.server.storage import PostgresStorage, utc_now

    PostgresStorage(url).close()
    now = utc_now()
    with psycopg.connect(url) as conn:
        with conn.cursor().copy(
            'COPY jobs (id, "user", local_id, text, metadata, status, created_at, updated_at, '
            "change_seq) FROM STDIN"
        ) as copy:
            for i in range(count):
                copy.write_row(
                    (
                        str(uuid.uuid4()),
                        "default",
                        str(uuid.uuid4()),
                        f'"job {i}"',
                        f'{{"n":{i}}}',
                        '"submitted"',
                        now,
                        now,
                        i + 1,
                    )
                )
        conn.execute("INSERT INTO collections VALUES ('default', %s, 0)", (count,))
        conn.execute("ANALYZE")


def one_change(base: str, rounds: int) -> dict[str, float]:
    with requests.Session() as session:
        changes_url, jobs_url = f"{base}/api/v1/changes", f"{base}/api/v1/jobs"
        started = time.perf_counter()
        pages = 0
        cursor = None
        while True:
            page = session.get(jobs_url, params={"cursor": cursor} if cursor else None).json()
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        listing = time.perf_counter() - started
        head = session.get(changes_url, params={"limit": 1}).json()
        job = page["jobs"][-1]
        # The checkpoint just before the last change: take the feed at the end, change a job.
        end = session.get(changes_url, params={"since": head["next"], "limit": 5000}).json()
        while end["more"]:
            end = session.get(changes_url, params={"since": end["next"], "limit": 5000}).json()
        session.patch(f"{jobs_url}/{job['id']}", json={"status": "done"})
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            answer = session.get(changes_url, params={"since": end["next"]}).json()
            times.append(time.perf_counter() - t0)
            assert len(answer["changes"]) == 1, answer
    return {"changes_ms": statistics.median(times) * 1000, "listing_s": listing, "pages": pages}


# -- (d) batch of 500 creates -------------------------------------------------------------------


def server_ms(log: Path, request: str) -> list[float]:
    """The times the single-process server logged for requests whose line holds `request`."""
    pattern = re.compile(r'"' + re.escape(request) + r'[^"]*" \d+ \d+ ([\d.]+)ms')
    return [float(m.group(1)) for m in pattern.finditer(log.read_text(errors="replace"))]


def batch_creates(base: str, rounds: int) -> tuple[float, float]:
    """Median client-side times of POST /api/v1/batch with 500 new creates, and with 500
    updates of jobs created so."""
    times, updates = [], []
    with requests.Session() as session:
        for _ in range(rounds):
            operations = [
                {
                    "op": "create",
                    "local_id": str(uuid.uuid4()),
                    "text": f"job {i}",
                    "metadata": {"i": i},
                }
                for i in range(500)
            ]
            started = time.perf_counter()
            answer = session.post(f"{base}/api/v1/batch", json={"operations": operations})
            times.append(time.perf_counter() - started)
            results = answer.json()["results"]
            assert [r["status"] for r in results] == [201] * 500
            operations = [
                {"op": "update", "id": r["job"]["id"], "fields": {"text": "edited"}}
                for r in results
            ]
            started = time.perf_counter()
            answer = session.post(f"{base}/api/v1/batch", json={"operations": operations})
            updates.append(time.perf_counter() - started)
            assert [r["status"] for r in answer.json()["results"]] == [200] * 500
    return statistics.median(times) * 1000, statistics.median(updates) * 1000


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--polls", type=int, default=500)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--only", choices=["a", "b", "c", "d"], help="run one part only")
    args = parser.parse_args()
    want = {args.only} if args.only else {"a", "b", "c", "d"}
    work = Path(tempfile.mkdtemp(prefix="jobsyncd-bench-feed-"))
    pg = bool(os.environ.get(PG_ENV))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; PostgreSQL: {pg}")
    try:
        tokens = [uuid.uuid4().hex for _ in range(args.agents)]
        token_file = work / "tokens"
        token_file.write_text("".join(f"agent{i} {t}\n" for i, t in enumerate(tokens)))
        setups = [("single", "sqlite"), ("gunicorn", "sqlite")] + (
            [("gunicorn", "postgres")] if pg else []
        )
        print(
            f"\n(a) load: {args.agents} agents x {args.jobs} jobs (create, update, delete), each holding a long-poll"
        )
        for kind, engine in setups if "a" in want else []:
            db = pg_database() if engine == "postgres" else str(work / f"load-{kind}.sqlite3")
            with server(kind, work, db or "", token_file) as (base, _pid, _log):
                r = load(base, tokens, args.jobs)
            print(
                f"  {kind:8} {engine:8} {r['requests']:6.0f} requests in {r['seconds']:5.1f} s: "
                f"{r['rate']:5.0f} req/s, p50 {r['p50']:5.1f} ms, p99 {r['p99']:6.1f} ms, "
                f"errors {r['errors']:.0f}, duplicates {r['duplicates']:.0f}, "
                f"feed mismatches {r['mismatches']:.0f}"
            )
        print(f"\n(b) fan-out: {args.polls} idle long-polls, one change (target p99 < 1000 ms)")
        for kind, engine in setups if "b" in want else []:
            db = pg_database() if engine == "postgres" else str(work / f"fan-{kind}.sqlite3")
            with server(kind, work, db or "", None) as (base, pid, _log):
                r = fan_out(base, pid, args.polls)
            print(
                f"  {kind:8} {engine:8} reached {r['reached']:.0f}/{args.polls}: p50 {r['p50']:6.1f} ms, "
                f"p99 {r['p99']:6.1f} ms, max {r['max']:6.1f} ms; server memory {r['rss']:.0f} MiB"
            )
        print(f"\n(c) one change at {args.big} jobs: /changes after it vs the full listing")
        for engine in (["sqlite"] + (["postgres"] if pg else [])) if "c" in want else []:
            if engine == "sqlite":
                db = str(work / "big.sqlite3")
                seed_sqlite(Path(db), args.big)
            else:
                db = pg_database() or ""
                seed_postgres(db, args.big)
            with server("single", work, db, None) as (base, _pid, log):
                r = one_change(base, 50)
                inside = statistics.median(server_ms(log, "GET /api/v1/changes?since=")[-50:])
            print(
                f"  single   {engine:8} /changes: server time {inside:.2f} ms, client-side "
                f"{r['changes_ms']:.2f} ms (medians of 50, target < 5 ms); "
                f"full listing: {r['listing_s'] * 1000:.0f} ms in {r['pages']:.0f} pages"
            )
        print("\n(d) POST /api/v1/batch of 500 new creates (target < 100 ms)")
        for engine in (["sqlite"] + (["postgres"] if pg else [])) if "d" in want else []:
            db = pg_database() if engine == "postgres" else str(work / "batch.sqlite3")
            with server("single", work, db or "", None) as (base, _pid, log):
                ms, updates_ms = batch_creates(base, 7)
                inside = statistics.median(server_ms(log, "POST /api/v1/batch")[::2])
            print(
                f"  single   {engine:8} server time {inside:.0f} ms, "
                f"client-side {ms:.0f} ms (medians of 7); 500 updates: {updates_ms:.0f} ms"
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
