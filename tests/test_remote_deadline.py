"""Remote's whole-answer limit in process, against a hostile server of ours on loopback: a
long-poll given a larger `answer_limit` may stay silent longer than the read timeout; an
answer past its limit is a read timeout; the requests in flight are visible while they last."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from hostile import HostileServer, Request, answer  # noqa: E402

from jobsyncd.remote import Remote, Transient, requests_in_flight  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def silent_then_answer(request: Request, conn: socket.socket, server: HostileServer) -> None:
    if not server.stopping.wait(1.5):
        answer(conn, 200, {"jobs": [], "next_cursor": None})


def test_an_answer_limit_longer_than_the_read_timeout_lets_a_long_poll_wait():
    with HostileServer(silent_then_answer) as srv:
        remote = Remote(srv.url + "/api/v1", timeout=1.0)
        try:
            response, _ = remote._send("GET", "/jobs", answer_limit=5.0)
            assert response.status_code == 200
            with pytest.raises(Transient):
                remote._send("GET", "/jobs")  # the default: silent past the 1 s read timeout
        finally:
            remote.close()


def test_a_request_in_flight_is_listed_with_its_deadline_until_it_ends():
    seen = []
    with HostileServer(silent_then_answer) as srv:
        remote = Remote(srv.url + "/api/v1", timeout=1.0)
        worker = threading.Thread(target=lambda: remote._send("GET", "/jobs", answer_limit=5.0))
        worker.start()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            seen = [f for f in requests_in_flight() if f.deadline is not None]
            time.sleep(0.01)
        worker.join(10)
        remote.close()
    assert seen and seen[0].limit == 5.0 and seen[0].within_limit(time.monotonic())
    assert requests_in_flight() == []
