"""The daemon's watchdog pings only while it makes progress (contract 5): a wait for the sync
lock longer than a watchdog period stops them (systemd would restart the daemon), a slow answer
within its whole-answer limit does not. Real daemons, a notify socket of ours, loopback servers.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

import pytest
import test_daemon
from helpers import poll
from hostile import HostileServer, Request
from test_daemon import Datagrams

# The daemon tests' fixtures: a daemon started and killed in teardown, a notify socket.
daemons = test_daemon.daemons
notify_socket = test_daemon.notify_socket

pytestmark = pytest.mark.timeout(90)


def pings_between(got: Datagrams, start: float, end: float) -> int:
    return sum(1 for t, m in got.got if m == "WATCHDOG=1" and start <= t < end)


def test_a_wait_for_the_sync_lock_longer_than_a_watchdog_period_stops_the_pings(
    cli,
    fault_server,
    daemons,
    notify_socket,
):
    path, sock = notify_socket
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    cli.data_dir.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(cli.data_dir / "sync.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a one-shot sync holding the lock would
        got = Datagrams(sock)
        d = daemons(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        ready = got.wait_for(lambda m: m == "READY=1")
        d.wait_line("no progress for a watchdog period", timeout=10)
        got.pump(2.0)
        quiet_from = time.monotonic()
        got.pump(2.0)
        assert pings_between(got, quiet_from, time.monotonic()) == 0, got.messages()[ready:]
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    resumed = got.wait_for(lambda m: m == "WATCHDOG=1", after=len(got.got), timeout=10)
    assert resumed
    poll(lambda: cli.json("status")["last_pass"], 10, "the pass once the lock is free")
    assert d.stop() == 0


def slow_but_within_limit(request: Request, conn: socket.socket, server: HostileServer) -> None:
    body = b'{"jobs": [], "next_cursor": null}'
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    server.trickle(conn, head + body, every=3.0 / (len(head) + len(body)))  # ~3 s of 6 allowed


def test_a_slow_answer_within_its_whole_answer_limit_keeps_the_pings_going(
    cli,
    daemons,
    notify_socket,
):
    path, sock = notify_socket
    with HostileServer(slow_but_within_limit) as srv:
        cli.env["JOBSYNCD_SERVER_URL"] = srv.url
        cli.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = "2"
        got = Datagrams(sock)
        d = daemons(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        got.wait_for(lambda m: m == "READY=1")
        poll(lambda: srv.requests, 10, "the listing request")
        start = time.monotonic()
        got.pump(2.5)
        assert pings_between(got, start, time.monotonic()) >= 3, got.messages()
        assert "no progress" not in d.log
        assert d.stop() == 0
