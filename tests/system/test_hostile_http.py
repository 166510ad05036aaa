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

import pytest
from faultserver import FaultServer
from helpers import poll
from hostile import HostileServer, Request, answer, recording_proxy

pytestmark = pytest.mark.timeout(120)

GENEROUS = 30.0  # a sync against a server that trickles must end well before this
TOKEN = "tok-9f8e7d6c5b4a-SECRET"


def run_sync(cli, *extra: str) -> subprocess.CompletedProcess[str]:
    """`jobsyncd sync --json`, failing the test if it is still running after GENEROUS s."""
    proc = cli.popen(*extra, "sync", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
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


# ---- item 8: plain http never goes through an environment proxy --------------------------------


def test_plain_http_never_goes_through_the_environment_proxy_and_the_sync_works(
    cli, fault_server: FaultServer
):
    lid = cli("create", "--text", "direct", check=True).stdout.strip()
    cli.env["JOBSYNCD_TOKEN"] = TOKEN
    fault_server.token = TOKEN
    with recording_proxy() as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            cli.env[name] = proxy.url
        for name in ("NO_PROXY", "no_proxy"):
            cli.env.pop(name, None)
        proc = run_sync(point(cli, fault_server.url, timeout="5"))
        assert proxy.connections == 0, [r.head for r in proxy.requests]
    assert proc.returncode == 0, proc.stderr
    assert cli.json("show", lid)["sync_status"] == "synced"
    assert fault_server.job_by_local_id(lid) is not None


# ---- item 7: a server that echoes the token ----------------------------------------------------


def echo_everything(request: Request, conn: socket.socket, server: HostileServer) -> None:
    """Echo the request head (the Authorization header with it) into every part of an answer a
    client might show: the error text, a redirect's Location, the content type."""
    head = request.head.decode("latin-1")
    auth = request.headers.get("authorization", "")
    if request.method == "POST":
        answer(conn, 500, {"error": f"cannot store; you sent {head}"})
    elif request.method == "PATCH":
        answer(conn, 422, {"error": f"bad fields from {auth}"})
    elif request.method == "GET" and request.path.endswith("/jobs"):
        answer(conn, 302, b"", {"Location": f"https://login.example/?h={auth}"})
    else:
        answer(conn, 200, b"<html>" + auth.encode(), {"Content-Type": f"text/html; {auth}"})


def test_a_server_that_echoes_the_token_never_gets_it_shown_stored_or_logged(cli, fault_server):
    cli.env["JOBSYNCD_TOKEN"] = TOKEN
    fault_server.token = TOKEN
    point(cli, fault_server.url, timeout="5")
    edited = cli("create", "--text", "to edit", check=True).stdout.strip()
    run_sync(cli)
    cli("update", edited, "--text", "edited", check=True)
    fresh = cli("create", "--text", "new", check=True).stdout.strip()
    with HostileServer(echo_everything) as srv:
        point(cli, srv.url)
        first = run_sync(cli)
        second = run_sync(cli, "-vv")
        assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in srv.requests)
    assert first.returncode == 1 and second.returncode == 1
    seen = [first.stdout, first.stderr, second.stdout, second.stderr]
    for lid in (edited, fresh):
        job = cli.json("show", lid)
        assert job["sync_status"] in ("error", "failed") and job["last_error"], job
        assert "***" in job["last_error"], job
        seen.append(json.dumps(job))
    assert "***" in first.stderr  # the listing's redirect, named in a warning
    seen += [cli("list", "--json").stdout, cli("status", "--json").stdout]
    for path in cli.data_dir.rglob("*"):
        if path.is_file():
            seen.append(path.read_bytes().decode("utf-8", "replace"))
    for text in seen:
        assert TOKEN not in text
