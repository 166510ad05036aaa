"""The installed `jobsyncd sync` against hostile servers of our own on loopback (issue 9).

Servers that trickle their answer (headers, or a body with or without Content-Length), echo the
token into their errors and redirects, never end their listing, or sit behind an environment
proxy: every command ends within a bounded time, with the contract's exit code and state, and
never shows the token. The servers are raw sockets (tests/hostile.py).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from faultserver import FaultServer
from helpers import poll
from hostile import HostileServer, Request, answer, recording_proxy

pytestmark = pytest.mark.timeout(120)

GENEROUS = 30.0  # a sync against a server that trickles must end well before this
TOKEN = "tok-9f8e7d6c5b4a-SECRET"


def run_sync(cli, *extra: str) -> subprocess.CompletedProcess[str]:
    """`jobsyncd sync --json`, failing the test if it is still running after GENEROUS s."""
    proc = cli.popen(
        *extra, "sync", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        poll(lambda: proc.poll() is not None, GENEROUS, "the sync to end")
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=10)
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def point(cli, url: str, timeout: str = "1"):
    cli.env["JOBSYNCD_SERVER_URL"] = url
    cli.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = timeout
    return cli


# ---- item 5: an answer trickled past the whole-answer limit -----------------------------------


def trickle_headers(request: Request, conn: socket.socket, server: HostileServer) -> None:
    server.trickle(conn, b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100_000, every=0.25)


def trickle_body_with_length(request: Request, conn: socket.socket, server: HostileServer) -> None:
    conn.sendall(
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    server.trickle(conn, b" " * 100_000, every=0.25)


def trickle_body_without_length(
    request: Request, conn: socket.socket, server: HostileServer
) -> None:
    conn.sendall(
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    )
    server.trickle(conn, b" " * 100_000, every=0.25)


@pytest.mark.parametrize(
    "behave", [trickle_headers, trickle_body_with_length, trickle_body_without_length]
)
def test_a_trickled_answer_ends_the_sync_in_bounded_time_with_the_job_in_error(cli, behave):
    lid = cli("create", "--text", "slow", check=True).stdout.strip()
    with HostileServer(behave) as srv:
        proc = run_sync(point(cli, srv.url))
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False and summary["errors"] == 1
    job = cli.json("show", lid)
    assert job["sync_status"] == "error" and job["retry_count"] == 1, job
    assert "longer than 3 s" in job["last_error"], job
