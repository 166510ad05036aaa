"""The installed `jobsyncd sync` against hostile servers of our own on loopback (issue 9).

Servers that trickle their answer (headers, or a body with or without Content-Length), echo the
token into their errors and redirects, never end their listing, or sit behind an environment
proxy: every command ends within a bounded time, with the contract's exit code and state, and
never shows the token. The servers are raw sockets (tests/support/hostile.py).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import uuid

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


# ---- item 6: a listing that never ends ---------------------------------------------------------


def listing_server(first_page: list[dict], endless: bool) -> HostileServer:
    """Serves `first_page`, then (when `endless`) empty pages with new cursors forever; a GET of
    one job answers 404, any other request 500."""

    def behave(request: Request, conn: socket.socket, server: HostileServer) -> None:
        if request.method == "GET" and request.path == "/api/v1/jobs":
            first = "cursor=" not in request.target
            jobs = first_page if first else []
            cursor = uuid.uuid4().hex if endless else None
            answer(conn, 200, {"jobs": jobs, "next_cursor": cursor})
        elif request.method == "GET":
            answer(conn, 404, {"error": "no such job"})
        else:
            answer(conn, 500, {"error": "read only"})

    return HostileServer(behave)


def test_a_listing_of_empty_pages_without_end_makes_the_pass_incomplete_and_removes_nothing(
    cli, fault_server
):
    ids = [cli("create", "--text", f"job {i}", check=True).stdout.strip() for i in range(3)]
    run_sync(point(cli, fault_server.url, timeout="5"))
    first_page = [j for j in fault_server.snapshot() if j["local_id"] == ids[0]]
    with listing_server(first_page, endless=True) as srv:
        proc = run_sync(point(cli, srv.url))
        pages = sum(1 for r in srv.requests if r.path == "/api/v1/jobs")
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False and summary["deleted_locally"] == 0
    assert "listing" in proc.stderr
    assert pages == 4  # the first page, then three that brought nothing new
    assert {j["local_id"] for j in cli.jobs()} == set(ids)
    assert all(j["sync_status"] == "synced" for j in cli.jobs())


# ---- items 3 and 4: invalid job objects in a listing -------------------------------------------


def test_an_invalid_job_in_a_listing_is_skipped_with_a_warning_and_the_rest_is_pulled(cli):
    good = {
        "id": "good-1",
        "local_id": str(uuid.uuid4()),
        "text": "fine",
        "metadata": {},
        "status": "submitted",
        "audio": None,
        "created_at": "2026-11-30T10:00:00Z",
        "updated_at": "2026-11-30T10:00:00Z",
    }
    bad_time = {
        **good,
        "id": "bad-time",
        "local_id": None,
        "updated_at": "0001-01-01T00:00:00+01:00",
    }
    bad_meta = {**good, "id": "bad-meta", "local_id": None, "metadata": {"k": "\ud800"}}
    with listing_server([bad_time, good, bad_meta], endless=False) as srv:
        proc = run_sync(point(cli, srv.url))
    assert proc.returncode == 1, proc.stderr
    assert "bad-time" in proc.stderr and "bad-meta" in proc.stderr
    assert "OverflowError" not in proc.stderr
    (pulled,) = cli.jobs()
    assert (pulled["server_id"], pulled["text"], pulled["local_id"]) == (
        "good-1",
        "fine",
        good["local_id"],
    )
    assert pulled["updated_at"] == "2026-11-30T10:00:00.000Z"


# ---- -vv: one line per request -----------------------------------------------------------------


def test_vv_logs_one_line_per_request_with_method_path_status_and_time_never_the_token(
    cli, fault_server
):
    cli.env["JOBSYNCD_TOKEN"] = TOKEN
    fault_server.token = TOKEN
    cli("create", "--text", "one", "--meta", f"secret={TOKEN}", check=True)
    proc = run_sync(point(cli, fault_server.url, timeout="5"), "-vv")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("jobsyncd: debug: ")]
    assert any(re.fullmatch(r"jobsyncd: debug: POST /api/v1/jobs 201 \d+ ms", x) for x in lines)
    assert any(re.fullmatch(r"jobsyncd: debug: GET /api/v1/jobs 200 \d+ ms", x) for x in lines)
    assert TOKEN not in proc.stderr
    assert len([x for x in lines if re.search(r" \d+ ms$", x)]) == len(fault_server.all_requests)


def test_a_trickled_answer_over_tls_also_ends_the_sync_in_bounded_time(cli, tmp_path):
    from test_tls import _make_ca_and_server_cert

    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    lid = cli("create", "--text", "slow over tls", check=True).stdout.strip()
    cli.env["JOBSYNCD_CA_BUNDLE"] = str(ca)
    with HostileServer(trickle_body_with_length, tls=context) as srv:
        proc = run_sync(point(cli, srv.url))
        assert srv.requests, "the request never got through TLS"
    assert proc.returncode == 1, proc.stderr
    job = cli.json("show", lid)
    assert job["sync_status"] == "error" and "longer than 3 s" in job["last_error"], job
