"""`jobsyncd sync --wait` with a daemon running (issue 10 item 4; contract section 2): the CLI
waits for the daemon's first pass that starts after the request and exits as that pass did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from faultserver import FaultServer
from helpers import poll


@pytest.fixture
def daemon(cli) -> Iterator[Callable[..., subprocess.Popen]]:
    procs: list[subprocess.Popen] = []

    def start(url: str, interval: str | None = "60") -> subprocess.Popen:
        proc = cli.popen(
            "--server", url, "daemon", *(("--interval", interval) if interval else ()),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(cli.data_dir.parent / "daemon.log", "a"),  # noqa: SIM115 - closed by exit
        )
        procs.append(proc)
        poll((cli.data_dir / "daemon.sock").exists, 15, "the daemon listens")
        poll((cli.data_dir / "last_pass.json").exists, 15, "the first pass ran")
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def sync_wait(cli, url: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = cli("--server", url, "sync", "--wait", *extra, timeout=60)
    assert "Traceback" not in proc.stderr
    return proc, time.monotonic() - t0


def test_sync_wait_prints_the_daemons_pass_and_exits_0(cli, daemon):
    with FaultServer() as srv:
        d = daemon(srv.url)
        srv.add_fault("GET", r"/api/v1/jobs", delay=1.0)  # the next pass lists slowly
        local_id = cli("create", "--text", "x", check=True).stdout.strip()
        proc, _ = sync_wait(cli, srv.url, "--json")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["handed_to_daemon"] == d.pid and summary["ok"] is True
        assert srv.job_by_local_id(local_id) is not None
        people, _ = sync_wait(cli, srv.url)
        assert people.returncode == 0 and f"pid {d.pid}" in people.stdout


def test_sync_wait_reports_a_pass_that_starts_after_the_request(cli, daemon):
    with FaultServer() as srv:
        daemon(srv.url)
        # The pass the create's wake-up starts pushes it, then hangs in its listing while a
        # second job is created and `sync --wait` asks: that pass must not be the one reported.
        slow = srv.add_fault("GET", r"/api/v1/jobs", delay=2.0)
        cli("create", "--text", "early", check=True)
        poll(lambda: slow.hits, 10, "the daemon's pass is listing")
        late = cli("create", "--text", "late", check=True).stdout.strip()
        assert srv.job_by_local_id(late) is None
        proc, _ = sync_wait(cli, srv.url, "--json")
        assert proc.returncode == 0
        assert srv.job_by_local_id(late) is not None  # pushed by the pass reported
        assert json.loads(proc.stdout)["created"] == 1


@pytest.mark.parametrize(
    "status, code",
    [(500, 1), (401, 77), (503, 75)],
)
def test_sync_wait_exits_as_the_daemons_pass_did(cli, daemon, status, code):
    with FaultServer() as srv:
        daemon(srv.url)
        cli("create", "--text", "x", check=True)
        srv.add_fault("POST", r"/api/v1/jobs", times=None, status=status, headers={"Retry-After": "1"})
        srv.add_fault("GET", r"/api/v1/jobs", times=None, status=status, headers={"Retry-After": "1"})
        proc, _ = sync_wait(cli, srv.url, "--json")
        assert proc.returncode == code, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["ok"] is False and summary["handed_to_daemon"] is not None
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jobsyncd: error: ")


def test_sync_wait_with_the_server_down_exits_75(cli, daemon):
    with FaultServer() as srv:
        url = srv.url
        daemon(url)
    proc, _ = sync_wait(cli, url)  # the server is gone now: the daemon's pass is offline
    assert proc.returncode == 75
    assert "try again later" in proc.stderr


def test_sync_wait_gives_up_after_three_intervals_when_the_daemon_does_not_report(cli, daemon):
    cli.env["JOBSYNCD_INTERVAL_SECONDS"] = "1"  # the daemon's and this sync's config
    with FaultServer() as srv:
        d = daemon(srv.url, interval=None)
        d.send_signal(signal.SIGSTOP)  # alive, holding its lock, answering nothing
        try:
            proc, took = sync_wait(cli, srv.url, "--json")
        finally:
            d.send_signal(signal.SIGCONT)
    assert proc.returncode == 75
    assert "did not report" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert 2.5 < took < 15
    assert not [n for n in os.listdir(cli.data_dir) if n.startswith("wait-")]


def test_sync_wait_without_a_daemon_runs_the_pass_here(cli):
    with FaultServer() as srv:
        cli("create", "--text", "x", check=True)
        proc, _ = sync_wait(cli, srv.url, "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["handed_to_daemon"] is None


def test_sync_wait_json_still_prints_a_summary_when_the_daemon_does_not_report(cli, daemon):
    cli.env["JOBSYNCD_INTERVAL_SECONDS"] = "1"
    with FaultServer() as srv:
        d = daemon(srv.url, interval=None)
        d.send_signal(signal.SIGSTOP)
        try:
            proc, _ = sync_wait(cli, srv.url, "--json")
        finally:
            d.send_signal(signal.SIGCONT)
    assert proc.returncode == 75
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False and summary["handed_to_daemon"] == d.pid


def test_sync_wait_is_answered_when_the_daemon_stops_first(cli, daemon):
    with FaultServer() as srv:
        d = daemon(srv.url)
        srv.add_fault("GET", r"/api/v1/jobs", delay=3.0)  # the pass runs long...
        cli("create", "--text", "x", check=True)
        waiting = cli.popen("--server", srv.url, "sync", "--wait", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        poll(lambda: [n for n in os.listdir(cli.data_dir) if n.startswith("wait-")], 10,
             "the sync is waiting")
        d.send_signal(signal.SIGTERM)  # ...and the daemon stops before the next one
        out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 75
    assert "the daemon stopped" in err


def test_a_quiet_sync_handed_to_the_daemon_prints_nothing(cli, daemon):
    with FaultServer() as srv:
        daemon(srv.url)
        for argv in (("-q", "sync"), ("sync", "-q")):
            proc = cli("--server", srv.url, *argv)
            assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.parametrize("wait", [False, True], ids=["sync", "sync --wait"])
def test_a_sync_handed_to_the_daemon_never_imports_the_http_client(cli, daemon, wait):
    # Issue 11: a cron `sync` beside a running daemon only hands over; requests and urllib3
    # (about 100 ms of imports) belong to the process that talks to the server.
    import sys

    with FaultServer() as srv:
        d = daemon(srv.url)
        code = (
            "import sys\n"
            "from jobsyncd.cli import main\n"
            "try:\n"
            f"    main(['--server', {srv.url!r}, 'sync', '--json'{', ' + repr('--wait') if wait else ''}])\n"
            "except SystemExit as exc:\n"
            "    rc = exc.code or 0\n"
            "heavy = sorted(m for m in ('requests', 'urllib3') if m in sys.modules)\n"
            "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
            "sys.exit(rc)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], env=cli.env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["handed_to_daemon"] == d.pid
        assert proc.stderr.splitlines()[-1] == "HEAVY=", proc.stderr
