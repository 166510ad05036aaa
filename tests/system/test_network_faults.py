"""The installed `jobsyncd sync --json` on a bad network and against a badly behaved server.

A FaultProxy (latency, connection resets after N bytes, a stall, a closed port) sits in front of
the in-process fault server or the reference server; the fault server also answers slowly, with
junk, with a sign-in page, with a redirect, and with bodies far larger than any job. In every case
the command ends within its time bounds with the contract's exit code, stderr holds only
`jobsyncd: error:` / `jobsyncd: warning:` lines (never a traceback), and no job is lost or
duplicated: once the network is healthy again one pass leaves exactly one server job per local job.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from faultserver import FaultProxy, FaultServer
from helpers import RefServer

pytestmark = pytest.mark.timeout(90)

JOBS = r"/api/v1/jobs"
ONE_JOB = r"/api/v1/jobs/.+"
TIMEOUT = 1  # JOBSYNCD_REQUEST_TIMEOUT_SECONDS in these tests
# A request ends within 3 x the timeout; a pass here makes at most a few; plus start-up.
COMMAND_BOUND = 20.0


# ---- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def srv(fault_server: FaultServer) -> FaultServer:
    return fault_server


@pytest.fixture
def proxy(srv: FaultServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", srv.port) as px:
        yield px


def point(cli, url: str):
    cli.env["JOBSYNCD_SERVER_URL"] = url
    cli.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = str(TIMEOUT)
    return cli


@pytest.fixture
def agent(cli, proxy: FaultProxy):
    """`jobsyncd` talking to the fault server through the proxy."""
    return point(cli, proxy.url)


@pytest.fixture
def direct(cli, srv: FaultServer):
    """`jobsyncd` talking to the fault server directly."""
    return point(cli, srv.url)


def check_stderr(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    for line in stderr.splitlines():
        if line.strip():
            assert line.startswith(("jobsyncd: error:", "jobsyncd: warning:")), (
                f"stray stderr line {line!r} in:\n{stderr}"
            )


def sync(cli, want: int, bound: float = COMMAND_BOUND) -> tuple[dict, str, float]:
    """Run `jobsyncd sync --json`; check exit code, stdout and stderr; return (summary, stderr,
    seconds taken)."""
    started = time.monotonic()
    proc = cli("sync", "--json", timeout=bound + 30)
    took = time.monotonic() - started
    check_stderr(proc.stderr)
    assert proc.returncode == want, (
        f"sync -> {proc.returncode}, want {want}\n{proc.stdout}\n{proc.stderr}"
    )
    assert took < bound, f"sync took {took:.1f} s (bound {bound} s)\n{proc.stderr}"
    summary = json.loads(proc.stdout)
    if want != 0:
        assert proc.stderr.count("jobsyncd: error:") >= 1, proc.stderr
    return summary, proc.stderr, took


def create(cli, text: str, *meta: str) -> str:
    args = ["create", "--text", text]
    for pair in meta:
        args += ["--meta", pair]
    proc = cli(*args, check=True)
    check_stderr(proc.stderr)
    return proc.stdout.strip()


def local_jobs(cli) -> dict[str, dict]:
    return {j["local_id"]: j for j in cli.jobs()}


def assert_one_server_job_per_local_job(cli, server_jobs: list[dict]) -> None:
    local = local_jobs(cli)
    by_local_id: dict[str, list[dict]] = {}
    for sj in server_jobs:
        by_local_id.setdefault(sj["local_id"], []).append(sj)
    dups = {lid: len(v) for lid, v in by_local_id.items() if len(v) > 1}
    assert not dups, f"duplicate server jobs: {dups}"
    assert set(by_local_id) == set(local), (sorted(by_local_id), sorted(local))
    for lid, job in local.items():
        (sj,) = by_local_id[lid]
        assert job["sync_status"] == "synced", job
        assert job["server_id"] == str(sj["id"])
        assert (job["text"], job["metadata"]) == (sj["text"], sj["metadata"])
        assert job["retry_count"] == 0 and job["last_error"] is None


def make_jobs(cli, count: int = 3) -> list[str]:
    return [create(cli, f"job {i}", f"n={i}") for i in range(count)]


# ---- the proxy: latency, resets, a stall, a closed port ------------------------------------------


def test_a_slow_network_still_syncs_every_job(agent, proxy, srv):
    ids = make_jobs(agent, 3)
    proxy.latency = 0.05
    summary, _, _ = sync(agent, want=0)
    assert summary["ok"] is True and summary["created"] == 3
    assert_one_server_job_per_local_job(agent, srv.snapshot())
    assert set(local_jobs(agent)) == set(ids)


@pytest.mark.parametrize("reset_after", [0, 40, 300])
def test_connections_reset_mid_answer_leave_jobs_in_error_and_a_healthy_pass_makes_no_duplicate(
    agent, proxy, srv, reset_after
):
    ids = make_jobs(agent, 3)
    proxy.reset_after = reset_after
    summary, stderr, _ = sync(agent, want=1)
    assert summary["ok"] is False and summary["skipped"] is None
    local = local_jobs(agent)
    assert set(local) == set(ids), "a job was lost"
    for job in local.values():
        # The server may have stored it (the answer was cut), the agent cannot know: retried.
        assert job["sync_status"] == "error", job
        assert job["retry_count"] == 1 and job["last_error"], job
    proxy.reset_after = None
    summary, _, _ = sync(agent, want=0)
    assert summary["ok"] is True
    assert_one_server_job_per_local_job(agent, srv.snapshot())


def test_a_reset_during_updates_and_deletes_is_retried_without_losing_or_duplicating(
    agent, proxy, srv
):
    ids = make_jobs(agent, 4)
    sync(agent, want=0)
    agent("update", ids[0], "--text", "changed", check=True)
    agent("update", ids[1], "--meta", "n=99", check=True)
    agent("delete", ids[2], check=True)
    proxy.reset_after = 0
    sync(agent, want=1)
    local = local_jobs(agent)
    assert set(local) == set(ids)
    assert local[ids[0]]["sync_status"] == "error" and local[ids[0]]["text"] == "changed"
    assert local[ids[1]]["sync_status"] == "error" and local[ids[1]]["metadata"] == {"n": 99}
    assert local[ids[2]]["sync_status"] == "pending_deletion"
    assert local[ids[2]]["retry_count"] == 1
    assert local[ids[3]]["sync_status"] == "synced"
    proxy.reset_after = None
    sync(agent, want=0)
    assert set(local_jobs(agent)) == {ids[0], ids[1], ids[3]}
    assert srv.job_by_local_id(ids[2]) is None
    assert_one_server_job_per_local_job(agent, srv.snapshot())


def test_a_stalled_connection_ends_within_the_timeouts_and_the_job_is_error_not_lost(
    agent, proxy, srv
):
    (lid,) = make_jobs(agent, 1)
    proxy.stall = True
    summary, stderr, took = sync(agent, want=1)
    assert summary["ok"] is False and summary["errors"] == 1
    job = local_jobs(agent)[lid]
    assert job["sync_status"] == "error" and job["retry_count"] == 1, job
    assert job["last_error"]
    proxy.stall = False
    sync(agent, want=0)
    assert_one_server_job_per_local_job(agent, srv.snapshot())


def test_a_closed_port_skips_the_pass_offline_with_exit_75_and_counts_no_retry(agent, proxy, srv):
    ids = make_jobs(agent, 2)
    proxy.closed = True
    for _ in range(2):
        summary, stderr, _ = sync(agent, want=75)
        assert summary["skipped"] == "offline" and summary["ok"] is False
        assert summary["errors"] == summary["failed"] == summary["created"] == 0
    for job in local_jobs(agent).values():
        assert job["sync_status"] == "pending" and job["retry_count"] == 0, job
        assert job["last_error"] is None
    assert srv.snapshot() == []
    proxy.reopen()
    sync(agent, want=0)
    assert set(local_jobs(agent)) == set(ids)
    assert_one_server_job_per_local_job(agent, srv.snapshot())


# ---- a badly behaved server -----------------------------------------------------------------------


def test_a_server_answering_slower_than_the_timeout_makes_the_job_error(direct, srv):
    (lid,) = make_jobs(direct, 1)
    srv.add_fault("POST", JOBS, delay=TIMEOUT * 3 + 0.5)
    summary, _, took = sync(direct, want=1)
    assert summary["errors"] == 1
    job = local_jobs(direct)[lid]
    assert job["sync_status"] == "error" and job["retry_count"] == 1
    # The slow answer may still have stored the job: the next pass makes no duplicate.
    srv.wait_for(lambda: srv.job_by_local_id(lid) is not None, timeout=10)
    sync(direct, want=0)
    assert_one_server_job_per_local_job(direct, srv.snapshot())


def test_a_listing_slower_than_the_timeout_removes_nothing_and_exits_1(direct, srv):
    make_jobs(direct, 2)
    sync(direct, want=0)
    srv.add_fault("GET", JOBS, delay=TIMEOUT * 3 + 0.5)
    summary, _, _ = sync(direct, want=1)
    assert summary["ok"] is False and summary["deleted_locally"] == 0
    assert len(local_jobs(direct)) == 2


@pytest.mark.parametrize(
    "fault",
    [
        {"garbage": True},
        {"garbage": True, "body": b'{"id": '},
        {"garbage": True, "body": b'{"id": "x", "text": 3, "metadata": []}'},
        {"garbage": True, "body": b"[1, 2, 3]"},
        {"content_type": "text/html"},
        {"content_type": "text/html", "status": 400},  # a proxy's error page
        {"status": 502, "content_type": "text/html"},
    ],
    ids=["junk", "truncated-json", "wrong-types", "a-list", "sign-in-page", "html-400", "html-502"],
)
def test_junk_answers_to_a_create_never_sync_the_job_nor_lose_it(direct, srv, fault):
    (lid,) = make_jobs(direct, 1)
    srv.add_fault("POST", JOBS, **fault)
    summary, stderr, _ = sync(direct, want=1)
    assert summary["ok"] is False
    job = local_jobs(direct)[lid]
    assert job["sync_status"] in ("error", "failed"), job
    assert job["last_error"]
    # An invalid job object that names a usable id has that id recorded (contract v5 6.4), so
    # that a later delete reaches the copy; the create is sent again until answered validly.
    assert job["server_id"] is None or fault.get("body", b"").find(b'"id"') != -1
    if fault.get("status") == 400:
        assert job["sync_status"] == "failed"  # any other 4xx fails at once (6.3)
        direct("retry", lid, check=True)
    else:
        assert job["sync_status"] == "error" and job["retry_count"] == 1
    sync(direct, want=0)
    assert_one_server_job_per_local_job(direct, srv.snapshot())


@pytest.mark.parametrize(
    "fault",
    [
        {"garbage": True},
        {"garbage": True, "body": b'{"jobs": "nope", "next_cursor": null}'},
        {"garbage": True, "body": b'{"jobs": [{"id": null}], "next_cursor": null}'},
        {"garbage": True, "body": b'{"jobs": [], "next_cursor": 7}'},
        {"content_type": "text/html"},
    ],
    ids=["junk", "jobs-not-a-list", "job-without-id", "bad-cursor", "sign-in-page"],
)
def test_a_junk_listing_removes_nothing_adds_nothing_and_exits_1(direct, srv, fault):
    ids = make_jobs(direct, 2)
    sync(direct, want=0)
    srv.add_fault("GET", JOBS, **fault)
    summary, _, _ = sync(direct, want=1)
    assert summary["ok"] is False
    assert summary["deleted_locally"] == 0 and summary["pulled"] == 0
    local = local_jobs(direct)
    assert set(local) == set(ids)
    assert all(j["sync_status"] == "synced" for j in local.values())
    sync(direct, want=0)


def test_a_captive_portal_redirect_makes_jobs_error_to_retry_not_failed(direct, srv):
    """A 302 to a sign-in page is 'an answer that is not the JSON expected' (6.3): `error`, retried
    by the next pass; `failed` (which waits for a manual `retry`) is only for a 4xx."""
    (lid,) = make_jobs(direct, 1)
    srv.add_fault(
        "POST",
        JOBS,
        status=302,
        content_type="text/html",
        headers={"Location": "http://portal.example/login"},
    )
    summary, _, _ = sync(direct, want=1)
    job = local_jobs(direct)[lid]
    assert job["sync_status"] == "error", job
    sync(direct, want=0)
    assert_one_server_job_per_local_job(direct, srv.snapshot())


@pytest.mark.parametrize("where", ["listing", "create"])
def test_a_300_mb_answer_is_refused_at_its_bound_quickly(direct, srv, where):
    make_jobs(direct, 1)
    if where == "listing":
        sync(direct, want=0)
        srv.add_fault("GET", JOBS, huge=300 << 20)
    else:
        srv.add_fault("POST", JOBS, huge=300 << 20)
    summary, stderr, took = sync(direct, want=1, bound=15)
    assert summary["ok"] is False
    assert "too large" in stderr or "larger than" in stderr, stderr
    assert len(local_jobs(direct)) == 1


# ---- a raw server whose answer never ends (no Content-Length) ---------------------------------------


class EndlessServer:
    """Answers every request 200 application/json with a chunked body that never ends: fast (as
    fast as the client reads) or as a slow drip (a few bytes every 0.2 s, each within the read
    timeout). Stops sending when the client goes away, after `limit` bytes or on close()."""

    def __init__(self, drip: bool, limit: int = 1 << 30) -> None:
        self.drip = drip
        self.limit = limit
        self.sent = 0
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                piece = conn.recv(4096)
                if not piece:
                    return
                data += piece
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            conn.sendall(b'7\r\n{"jobs"\r\n3\r\n:[0\r\n')
            chunk = b",0" * (32 << 10)
            frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
            drip = b"2\r\n,0\r\n"
            while not self.stop.is_set() and self.sent < self.limit:
                if self.drip:
                    conn.sendall(drip)
                    self.sent += 2
                    self.stop.wait(0.2)
                else:
                    conn.sendall(frame)
                    self.sent += len(chunk)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.acceptor.join(5)
        self.sock.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture
def endless_drip() -> Iterator[EndlessServer]:
    s = EndlessServer(drip=True)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def endless_flood() -> Iterator[EndlessServer]:
    s = EndlessServer(drip=False)
    try:
        yield s
    finally:
        s.close()


def test_a_listing_that_drips_forever_ends_after_three_times_the_timeout(cli, endless_drip):
    point(cli, endless_drip.url)
    summary, stderr, took = sync(cli, want=1, bound=3 * TIMEOUT + 10)
    assert summary["ok"] is False
    assert "longer than" in stderr or "in time" in stderr, stderr


def test_a_listing_that_floods_forever_is_cut_off_at_the_page_bound(cli, endless_flood):
    """The agent stops reading at its bound (remote.MAX_PAGE_ANSWER_BYTES) or at 3 x the timeout,
    whichever comes first, and never holds much more than that bound in memory."""
    from jobsyncd.remote import MAX_PAGE_ANSWER_BYTES

    point(cli, endless_flood.url)
    summary, stderr, took = sync(cli, want=1, bound=3 * TIMEOUT + 15)
    assert summary["ok"] is False
    # Whatever it read, it read no more than its bound (plus a chunk) before giving up.
    assert endless_flood.sent <= MAX_PAGE_ANSWER_BYTES + (8 << 20) + (4 << 20), endless_flood.sent
    # The peak of this command alone (RUSAGE_CHILDREN of pytest would count every earlier child).
    measure = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", measure, cli.binary, "sync", "--json"],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT + 30,
    )
    peak_kib = int(proc.stdout.strip())
    assert peak_kib * 1024 < 2 * MAX_PAGE_ANSWER_BYTES + (128 << 20), peak_kib


# ---- the reference server behind the proxy ----------------------------------------------------------


@pytest.fixture
def ref_proxy(ref_server: RefServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", ref_server.port) as px:
        yield px


@pytest.mark.parametrize("reset_after", [0, 120])
def test_resets_in_front_of_the_reference_server_leave_one_server_job_per_local_job(
    cli, ref_server, ref_proxy, reset_after
):
    point(cli, ref_proxy.url)
    ids = make_jobs(cli, 3)
    ref_proxy.reset_after = reset_after
    sync(cli, want=1)
    assert set(local_jobs(cli)) == set(ids)
    ref_proxy.reset_after = None
    sync(cli, want=0)
    assert_one_server_job_per_local_job(cli, ref_server.jobs())


def test_latency_and_a_closed_port_in_front_of_the_reference_server(cli, ref_server, ref_proxy):
    point(cli, ref_proxy.url)
    ids = make_jobs(cli, 2)
    ref_proxy.closed = True
    summary, _, _ = sync(cli, want=75)
    assert summary["skipped"] == "offline"
    assert all(j["retry_count"] == 0 for j in local_jobs(cli).values())
    ref_proxy.reopen()
    ref_proxy.latency = 0.05
    sync(cli, want=0)
    assert set(local_jobs(cli)) == set(ids)
    assert_one_server_job_per_local_job(cli, ref_server.jobs())
