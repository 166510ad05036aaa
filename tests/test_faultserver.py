"""Tests of the test helpers in tests/support/faultserver.py (FaultServer, FaultProxy)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid

import pytest
import requests
from faultserver import FaultProxy, FaultServer, parse_multipart  # noqa: E402

JOBS = "/api/v1/jobs"


def wait_until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def lid() -> str:
    return str(uuid.uuid4())


@pytest.fixture(autouse=True)
def no_thread_leak():
    yield

    def ours():
        return [
            t
            for t in threading.enumerate()
            if t.name.startswith(("faultserver", "faultproxy")) and t.is_alive()
        ]

    assert wait_until(lambda: not ours(), timeout=5), ours()


@pytest.fixture
def srv():
    s = FaultServer(token=None)
    try:
        yield s
    finally:
        s.close()
        assert s.alive_threads == 0


@pytest.fixture
def http():
    with requests.Session() as s:
        yield s


def post(http, srv, **body):
    body.setdefault("local_id", lid())
    return http.post(srv.url + JOBS, json=body, timeout=5)


# ------------------------------------------------------------------------------------------
# API


def test_crud_json(srv, http):
    r = post(http, srv, text="hello", metadata={"a": 1})
    assert r.status_code == 201
    job = r.json()
    assert set(job) == {
        "id",
        "local_id",
        "text",
        "metadata",
        "status",
        "audio",
        "created_at",
        "updated_at",
    }
    assert job["status"] == "submitted" and job["audio"] is None and job["text"] == "hello"
    jid = job["id"]
    assert http.get(f"{srv.url}{JOBS}/{jid}", timeout=5).json() == job
    r = http.patch(f"{srv.url}{JOBS}/{jid}", json={"metadata": {"b": 2}}, timeout=5)
    assert r.status_code == 200
    assert r.json()["metadata"] == {"b": 2} and r.json()["text"] == "hello"
    assert r.json()["updated_at"] != job["updated_at"]
    assert srv.jobs[jid]["metadata"] == {"b": 2}
    r = http.delete(f"{srv.url}{JOBS}/{jid}", timeout=5)
    assert r.status_code == 204 and r.content == b""
    assert http.get(f"{srv.url}{JOBS}/{jid}", timeout=5).status_code == 404
    assert http.delete(f"{srv.url}{JOBS}/{jid}", timeout=5).status_code == 404
    assert http.patch(f"{srv.url}{JOBS}/{jid}", json={"text": "x"}, timeout=5).status_code == 404
    assert srv.snapshot() == []


def test_errors(srv, http):
    r = http.post(srv.url + JOBS, json={"text": "no local id"}, timeout=5)
    assert r.status_code == 422 and "error" in r.json()
    assert post(http, srv, local_id="not-a-uuid").status_code == 422
    assert post(http, srv, metadata=[1]).status_code == 422
    r = http.post(
        srv.url + JOBS, data=b"{broken", headers={"Content-Type": "application/json"}, timeout=5
    )
    assert r.status_code == 400
    r = http.post(srv.url + JOBS, data=b"x=1", headers={"Content-Type": "text/plain"}, timeout=5)
    assert r.status_code == 415
    r = http.put(srv.url + JOBS, json={}, timeout=5)
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
    # the keep-alive connection is still in sync after all those errors
    assert post(http, srv).status_code == 201
    assert len(srv.snapshot()) == 1


def test_idempotent_post(srv, http):
    local = lid()
    r1 = post(http, srv, local_id=local, text="one")
    r2 = post(http, srv, local_id=local, text="two")
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r2.json() == r1.json()
    assert len(srv.snapshot()) == 1 and srv.snapshot()[0]["text"] == "one"
    assert srv.job_by_local_id(local)["id"] == r1.json()["id"]


def test_multipart_post_and_patch(srv, http):
    audio = os.urandom(3000) + b"\r\n--not-a-boundary\r\n"
    r = http.post(
        srv.url + JOBS,
        data={"local_id": lid(), "text": "voice", "metadata": json.dumps({"k": "v"})},
        files={"audio": ("memo.wav", audio, "audio/wav")},
        timeout=5,
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["text"] == "voice" and job["metadata"] == {"k": "v"}
    assert job["audio"] == {
        "filename": "memo.wav",
        "size": len(audio),
        "sha256": hashlib.sha256(audio).hexdigest(),
    }
    assert srv.audio_bytes(job["id"]) == audio
    new = b"RIFF" + os.urandom(100)
    r = http.patch(f"{srv.url}{JOBS}/{job['id']}", files={"audio": ("b.wav", new)}, timeout=5)
    assert r.status_code == 200
    assert r.json()["audio"]["sha256"] == hashlib.sha256(new).hexdigest()
    assert r.json()["text"] == "voice"
    assert srv.audio_bytes(job["id"]) == new


def test_parse_multipart_direct():
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="f"; filename="x;y.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n\x00\r\n\x01\r\n--XyZ--\r\n"
    )
    parts = parse_multipart(body, 'multipart/form-data; boundary="XyZ"')
    assert parts["a"]["data"] == b"1"
    assert parts["f"]["filename"] == "x;y.bin" and parts["f"]["data"] == b"\x00\r\n\x01"
    with pytest.raises(ValueError):
        parse_multipart(
            b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\n1',
            "multipart/form-data; boundary=XyZ",
        )


def test_token(http):
    with FaultServer(token="s3cret") as s:
        r = http.get(s.url + JOBS, timeout=5)
        assert r.status_code == 401 and "error" in r.json()
        r = http.get(s.url + JOBS, headers={"Authorization": "Bearer wrong"}, timeout=5)
        assert r.status_code == 401
        r = http.post(
            s.url + JOBS,
            json={"local_id": lid()},
            headers={"Authorization": "Bearer wrong"},
            timeout=5,
        )
        assert r.status_code == 401 and s.snapshot() == []
        r = http.get(s.url + JOBS, headers={"Authorization": "Bearer s3cret"}, timeout=5)
        assert r.status_code == 200 and r.json() == {"jobs": [], "next_cursor": None}
        assert s.requests[-1][2]["authorization"] == "Bearer s3cret"


def read_all(http, srv, limit=None):
    pages, cursor = [], None
    while True:
        params = {}
        if limit:
            params["limit"] = limit
        if cursor:
            params["cursor"] = cursor
        r = http.get(srv.url + JOBS, params=params, timeout=5)
        assert r.status_code == 200
        pages.append(r.json()["jobs"])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages


def test_paging_listing_limit(srv, http):
    ids = [post(http, srv, text=str(i)).json()["id"] for i in range(5)]
    assert [len(p) for p in read_all(http, srv)] == [5]
    assert [len(p) for p in read_all(http, srv, limit=3)] == [3, 2]
    srv.listing_limit = 2
    pages = read_all(http, srv)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [j["id"] for p in pages for j in p] == ids
    # the cursor stays valid while jobs are created and deleted
    r = http.get(srv.url + JOBS, timeout=5).json()
    srv.server_delete(ids[1])
    srv.server_delete(ids[2])
    new = post(http, srv).json()["id"]
    rest = []
    cursor = r["next_cursor"]
    while cursor:
        r2 = http.get(srv.url + JOBS, params={"cursor": cursor}, timeout=5).json()
        rest += [j["id"] for j in r2["jobs"]]
        cursor = r2["next_cursor"]
    assert rest == [ids[3], ids[4], new]
    assert http.get(srv.url + JOBS, params={"cursor": "junk"}, timeout=5).status_code == 400
    assert srv.count("GET", JOBS + "?cursor=") >= 3


def test_etag_304(srv, http):
    jid = post(http, srv).json()["id"]
    r = http.get(srv.url + JOBS, timeout=5)
    etag = r.headers["ETag"]
    r = http.get(srv.url + JOBS, headers={"If-None-Match": etag}, timeout=5)
    assert r.status_code == 304 and r.content == b"" and r.headers["ETag"] == etag
    srv.server_edit(jid, text="changed on server", status="done")
    assert srv.jobs[jid]["text"] == "changed on server"
    r = http.get(srv.url + JOBS, headers={"If-None-Match": etag}, timeout=5)
    assert r.status_code == 200 and r.headers["ETag"] != etag
    assert r.json()["jobs"][0]["status"] == "done"
    etag2 = r.headers["ETag"]
    srv.server_delete(jid)
    r = http.get(srv.url + JOBS, headers={"If-None-Match": etag2}, timeout=5)
    assert r.status_code == 200 and r.json()["jobs"] == []
    made = srv.server_create(text=None)
    assert srv.jobs[made["id"]]["text"] is None and srv.etag != r.headers["ETag"]


def test_requests_log_and_count(srv, http):
    post(http, srv)
    http.get(srv.url + JOBS + "?limit=7", timeout=5)
    reqs = srv.requests
    assert [(m, p) for m, p, _ in reqs] == [("POST", JOBS), ("GET", JOBS + "?limit=7")]
    assert reqs[0][2]["Content-Type"] == "application/json"
    assert srv.count("POST", JOBS) == 1 and srv.count("GET", JOBS) == 1
    assert srv.count(None, "/api") == 2 and srv.count("DELETE", JOBS) == 0


# ------------------------------------------------------------------------------------------
# faults


def test_status_faults_in_order(srv, http):
    f1 = srv.add_fault("POST", JOBS, status=500)
    f2 = srv.add_fault("POST", JOBS, times=2, status=429, headers={"Retry-After": "2"})
    f3 = srv.add_fault("GET", JOBS, status=503, body={"error": "maint"})
    r = post(http, srv)
    assert r.status_code == 500 and "error" in r.json()
    r = post(http, srv)
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    assert post(http, srv).status_code == 429
    assert post(http, srv).status_code == 201
    assert (f1.hits, f2.hits) == (1, 2) and f3.hits == 0
    r = http.get(srv.url + JOBS, timeout=5)
    assert r.status_code == 503 and r.json() == {"error": "maint"} and f3.hits == 1
    assert len(srv.snapshot()) == 1  # status faults do not store


def test_fault_path_regex_and_forever(srv, http):
    jid = post(http, srv).json()["id"]
    f = srv.add_fault(path=JOBS + "/.+", times=None, status=404)
    for _ in range(3):
        assert http.get(f"{srv.url}{JOBS}/{jid}", timeout=5).status_code == 404
    assert http.get(srv.url + JOBS, timeout=5).status_code == 200  # fullmatch: not the list
    assert f.hits == 3
    srv.clear_faults()
    assert http.get(f"{srv.url}{JOBS}/{jid}", timeout=5).status_code == 200
    with pytest.raises(TypeError):
        srv.add_fault(status=500, garbage=True, drop_before=True)
    with pytest.raises(TypeError):
        srv.add_fault(bogus=1)


def test_delay(srv, http):
    f = srv.add_fault("GET", JOBS, delay=0.3)
    t0 = time.monotonic()
    assert http.get(srv.url + JOBS, timeout=5).status_code == 200
    assert time.monotonic() - t0 >= 0.3 and f.hits == 1
    srv.add_fault("GET", JOBS, delay=0.05, status=503)
    assert http.get(srv.url + JOBS, timeout=5).status_code == 503
    srv.add_fault("GET", JOBS, delay=2)
    with pytest.raises(requests.ReadTimeout):
        http.get(srv.url + JOBS, timeout=0.2)


def test_delay_event(srv, http):
    ev = threading.Event()
    f = srv.add_fault("POST", JOBS, delay_event=ev)
    out = {}

    def worker():
        out["r"] = requests.post(srv.url + JOBS, json={"local_id": lid()}, timeout=10)

    t = threading.Thread(target=worker)
    t.start()
    assert wait_until(lambda: f.hits == 1)
    assert "r" not in out and srv.snapshot() == []
    ev.set()
    t.join(5)
    assert out["r"].status_code == 201 and len(srv.snapshot()) == 1


def test_drop_after_store(srv, http):
    local = lid()
    f = srv.add_fault("POST", JOBS, drop_after_store=True)
    with pytest.raises(requests.ConnectionError):
        post(http, srv, local_id=local)
    assert f.hits == 1 and len(srv.snapshot()) == 1  # stored, answer lost
    r = post(http, srv, local_id=local)
    assert r.status_code == 200 and len(srv.snapshot()) == 1


def test_drop_before(srv, http):
    srv.add_fault("POST", JOBS, drop_before=True)
    with pytest.raises(requests.ConnectionError):
        post(http, srv)
    assert srv.snapshot() == []
    assert post(http, srv).status_code == 201


def test_garbage_and_content_type(srv, http):
    srv.add_fault("GET", JOBS, garbage=True)
    r = http.get(srv.url + JOBS, timeout=5)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    srv.add_fault("POST", JOBS, content_type="text/html")
    r = post(http, srv)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert b"<html>" in r.content and srv.snapshot() == []


def test_huge(srv, http):
    n = 3 * 1024 * 1024 + 17
    srv.add_fault("GET", JOBS, huge=n)
    r = http.get(srv.url + JOBS, timeout=5)
    assert r.status_code == 200 and len(r.content) == n
    # a client that gives up early frees the server thread
    big = 1 << 30
    f = srv.add_fault("GET", JOBS, huge=big)
    r = requests.get(srv.url + JOBS, stream=True, timeout=5)
    assert int(r.headers["Content-Length"]) == big
    next(r.iter_content(4096))
    r.close()
    assert f.hits == 1
    assert wait_until(lambda: srv.alive_threads <= 1, timeout=5)  # only the Session's own


def test_stall(srv, http):
    f = srv.add_fault("GET", JOBS, stall=True)
    t0 = time.monotonic()
    with pytest.raises(requests.RequestException):
        http.get(srv.url + JOBS, timeout=0.3)
    assert f.hits == 1 and time.monotonic() - t0 < 3
    # a stalled answer and a pending delay_event do not hold close() up
    srv.add_fault("GET", JOBS, stall=True)
    srv.add_fault("POST", JOBS, delay_event=threading.Event())
    results = []

    def client(fn):
        try:
            fn()
        except requests.RequestException as e:
            results.append(e)

    ts = [
        threading.Thread(target=client, args=(lambda: requests.get(srv.url + JOBS, timeout=20),)),
        threading.Thread(target=client, args=(lambda: post(requests, srv),)),
    ]
    for t in ts:
        t.start()
    assert wait_until(lambda: srv.count(None, JOBS) >= 3)
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 3 and srv.alive_threads == 0
    for t in ts:
        t.join(5)
    assert len(results) == 2


def test_empty_listing(srv, http):
    post(http, srv)
    etag = http.get(srv.url + JOBS, timeout=5).headers["ETag"]
    f = srv.add_fault(empty_listing=True)
    jid = post(http, srv).json()["id"]
    assert http.get(f"{srv.url}{JOBS}/{jid}", timeout=5).status_code == 200  # not a listing
    r = http.get(srv.url + JOBS, headers={"If-None-Match": etag}, timeout=5)
    assert r.status_code == 200 and r.json() == {"jobs": [], "next_cursor": None}
    assert r.headers["ETag"] not in (etag, srv.etag) and f.hits == 1
    assert len(http.get(srv.url + JOBS, timeout=5).json()["jobs"]) == 2


def test_fail_page(srv, http):
    for _ in range(5):
        post(http, srv)
    srv.listing_limit = 2
    f = srv.add_fault(fail_page=2)
    f3 = srv.add_fault(fail_page=3, status=503)
    r1 = http.get(srv.url + JOBS, timeout=5)
    assert r1.status_code == 200 and f.hits == 0
    cur = r1.json()["next_cursor"]
    r2 = http.get(srv.url + JOBS, params={"cursor": cur}, timeout=5)
    assert r2.status_code == 500 and f.hits == 1
    r2 = http.get(srv.url + JOBS, params={"cursor": cur}, timeout=5)
    assert r2.status_code == 200
    r3 = http.get(srv.url + JOBS, params={"cursor": r2.json()["next_cursor"]}, timeout=5)
    assert r3.status_code == 503 and f3.hits == 1


# ------------------------------------------------------------------------------------------
# proxy


@pytest.fixture
def proxy(srv):
    p = FaultProxy("127.0.0.1", srv.port)
    try:
        yield p
    finally:
        p.close()
        assert p.alive_threads == 0


def test_proxy_passthrough_and_latency(srv, proxy, http):
    assert proxy.url == f"http://127.0.0.1:{proxy.port}"
    r = http.post(proxy.url + JOBS, json={"local_id": lid()}, timeout=5)
    assert r.status_code == 201
    big = os.urandom(2 * 1024 * 1024)
    r = http.post(
        proxy.url + JOBS, data={"local_id": lid()}, files={"audio": ("a", big)}, timeout=10
    )
    assert r.status_code == 201 and r.json()["audio"]["size"] == len(big)
    proxy.latency = 0.2
    t0 = time.monotonic()
    assert http.get(proxy.url + JOBS, timeout=5).status_code == 200
    assert time.monotonic() - t0 >= 0.4  # request and answer each delayed
    proxy.latency = 0


def test_proxy_reset_after(srv, proxy, http):
    proxy.reset_after = 0
    with pytest.raises(requests.ConnectionError):
        http.post(proxy.url + JOBS, json={"local_id": lid()}, timeout=5)
    assert len(srv.snapshot()) == 1  # the server got it, the answer was lost
    proxy.reset_after = 20  # part of the headers only
    with pytest.raises(requests.ConnectionError):
        http.get(proxy.url + JOBS, timeout=5)
    proxy.reset_after = None
    assert http.get(proxy.url + JOBS, timeout=5).status_code == 200


def test_proxy_stall(srv, proxy, http):
    proxy.stall = True
    with pytest.raises(requests.ReadTimeout):
        http.get(proxy.url + JOBS, timeout=0.3)
    assert srv.count() == 0
    proxy.stall = False
    assert http.get(proxy.url + JOBS, timeout=5).status_code == 200


def test_proxy_closed_and_reopen(srv, proxy, http):
    assert http.get(proxy.url + JOBS, timeout=5).status_code == 200  # pooled connection
    proxy.closed = True
    assert proxy.closed
    with pytest.raises(requests.ConnectionError):
        http.get(proxy.url + JOBS, timeout=5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    proxy.reopen()
    assert not proxy.closed
    assert http.get(proxy.url + JOBS, timeout=5).status_code == 200
    proxy.closed = True
    proxy.closed = False
    assert http.get(proxy.url + JOBS, timeout=5).status_code == 200


def test_proxy_close_with_stalled_connections(srv):
    p = FaultProxy("127.0.0.1", srv.port)
    p.stall = True
    socks = [socket.create_connection(("127.0.0.1", p.port), timeout=2) for _ in range(3)]
    assert wait_until(lambda: p.connections == 3)
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 3 and p.alive_threads == 0
    for s in socks:
        s.close()
