"""Malformed and oversized requests get a JSON 4xx (never a 500 or a traceback), store nothing,
and leave the connection usable or close it only after the answer."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Callable

import pytest
import requests
from serverproc import RunningServer, new_job

GOOD_ID = "6f1c2c1e-3d4b-4a7e-9f3e-2b1a0c9d8e7f"


def assert_error(answer: requests.Response, status: int) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    assert isinstance(answer.json()["error"], str)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b"[1, 2]", 400),
        (b'"a string"', 400),
        (b'{"local_id": "' + GOOD_ID.encode() + b'", "metadata": {"x": NaN}}', 400),
        (b"\xff\xfe{}", 400),
        (b"[" * 100_000, 400),
        (b'{"text": "no local id"}', 422),
        (b'{"local_id": "not-a-uuid"}', 422),
        (b'{"local_id": 12}', 422),
        (b'{"local_id": null}', 422),
        (b'{"local_id": "' + GOOD_ID.encode() + b'", "text": 5}', 422),
        (b'{"local_id": "' + GOOD_ID.encode() + b'", "metadata": []}', 422),
        (b'{"local_id": "' + GOOD_ID.encode() + b'", "metadata": "x"}', 422),
        (b'{"local_id": "' + GOOD_ID.encode() + b'", "metadata": null}', 422),
        (b'{"local_id": "' + GOOD_ID.encode() + b'", "colour": "red"}', 422),
        (b'{"local_id": "' + GOOD_ID.encode() + b'", "text": "\\ud800"}', 422),
    ],
)
def test_a_bad_json_create_is_refused_and_stores_nothing(
    server: RunningServer, body: bytes, status: int
) -> None:
    with server.session() as client:
        answer = client.post(
            server.jobs_url, data=body, headers={"Content-Type": "application/json"}
        )
        assert_error(answer, status)
        assert client.get(server.jobs_url).json()["jobs"] == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"text": 5}, 422),
        ({"metadata": "x"}, 422),
        ({"status": ""}, 422),
        ({"status": 3}, 422),
        ({"local_id": GOOD_ID}, 422),
        ({"audio": "x.wav"}, 422),  # only null (removes the audio) is a value
        ([], 400),
    ],
)
def test_a_bad_json_change_is_refused_and_changes_nothing(
    shared_server: RunningServer, client: requests.Session, body: object, status: int
) -> None:
    job = new_job(client, shared_server.jobs_url)
    url = f"{shared_server.jobs_url}/{job['id']}"
    assert_error(client.patch(url, json=body), status)
    assert client.get(url).json() == job


def test_a_wrong_content_type_is_415(
    shared_server: RunningServer, client: requests.Session
) -> None:
    job = new_job(client, shared_server.jobs_url)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        headers = {"Content-Type": content_type}
        body = f'{{"local_id": "{uuid.uuid4()}"}}'
        assert_error(client.post(shared_server.jobs_url, data=body, headers=headers), 415)
        url = f"{shared_server.jobs_url}/{job['id']}"
        assert_error(client.patch(url, data='{"text": "x"}', headers=headers), 415)


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"text": "no local id"}, 422),
        ({"local_id": "nope"}, 422),
        ({"local_id": GOOD_ID, "metadata": "{not json"}, 422),
        ({"local_id": GOOD_ID, "metadata": "[1]"}, 422),
        ({"local_id": GOOD_ID, "colour": "red"}, 422),
    ],
)
def test_a_bad_multipart_create_is_refused_and_stores_no_audio(
    server: RunningServer, fields: dict[str, str], status: int
) -> None:
    with server.session() as client:
        answer = client.post(server.jobs_url, data=fields, files={"audio": ("a.wav", b"x" * 5000)})
        assert_error(answer, status)
        assert client.get(server.jobs_url).json()["jobs"] == []
    assert [p for p in server.audio_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    "body",
    [
        b"no boundary at all",
        b'--BOUNDARY\r\nContent-Disposition: form-data; name="local_id"\r\n\r\n' + GOOD_ID.encode(),
        b"--BOUNDARY\r\nno colon here\r\n\r\nx\r\n--BOUNDARY--\r\n",
        b"--BOUNDARY\r\nContent-Disposition: attachment\r\n\r\nx\r\n--BOUNDARY--\r\n",
        b"--BOUNDARY\r\nContent-Disposition: form-data\r\n\r\nx\r\n--BOUNDARY--\r\n",
        b'--BOUNDARY\r\nContent-Disposition: form-data; name="text"\r\n\r\n\xff\r\n--BOUNDARY--\r\n',
        b"--BOUNDARYxx",
        (
            b'--BOUNDARY\r\nContent-Disposition: form-data; name="local_id"\r\n\r\n'
            + GOOD_ID.encode()
            + b'\r\n--BOUNDARY\r\nContent-Disposition: form-data; name="local_id"\r\n\r\n'
            + GOOD_ID.encode()
            + b"\r\n--BOUNDARY--\r\n"
        ),
    ],
)
def test_a_malformed_multipart_body_is_400(server: RunningServer, body: bytes) -> None:
    with server.session() as client:
        answer = client.post(
            server.jobs_url,
            data=body,
            headers={"Content-Type": "multipart/form-data; boundary=BOUNDARY"},
        )
        assert_error(answer, 400)
        assert client.get(server.jobs_url).json()["jobs"] == []
        no_boundary = client.post(
            server.jobs_url, data=b"x", headers={"Content-Type": "multipart/form-data"}
        )
        assert_error(no_boundary, 400)


def test_an_oversized_json_body_is_413_and_the_connection_stays_usable(
    server: RunningServer,
) -> None:
    big = b'{"local_id": "' + GOOD_ID.encode() + b'", "text": "' + b"x" * (1 << 20) + b'"}'
    with server.session() as client:
        assert_error(
            client.post(server.jobs_url, data=big, headers={"Content-Type": "application/json"}),
            413,
        )
        assert client.get(server.jobs_url).json()["jobs"] == []


def test_an_oversized_audio_part_is_413_and_nothing_is_stored(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory("--max-upload-bytes", "100000")
    with server.session() as client:
        answer = client.post(
            server.jobs_url,
            data={"local_id": GOOD_ID},
            files={"audio": ("big.wav", b"a" * 100_001)},
        )
        assert_error(answer, 413)
        assert client.get(server.jobs_url).json()["jobs"] == []
        exact = client.post(
            server.jobs_url,
            data={"local_id": GOOD_ID},
            files={"audio": ("ok.wav", b"a" * 100_000)},
        )
        assert exact.status_code == 201
        job = exact.json()
        too_big_patch = client.patch(
            f"{server.jobs_url}/{job['id']}", files={"audio": ("big.wav", b"b" * 300_000)}
        )
        assert_error(too_big_patch, 413)
        assert client.get(f"{server.jobs_url}/{job['id']}").json() == job
    stored = [p for p in server.audio_dir.rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0].stat().st_size == 100_000


def raw_exchange(server: RunningServer, request: bytes, send_more: bytes = b"") -> bytes:
    """Send raw bytes; read one answer (headers and Content-Length body) or until closed."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        try:
            if send_more:
                sock.sendall(send_more)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_WR)  # no more is coming: a short body ends here
        except OSError:
            pass
        answer = b""
        while True:
            head, sep, rest = answer.partition(b"\r\n\r\n")
            if sep:
                match = re.search(rb"(?im)^content-length: *(\d+)", head)
                if len(rest) >= (int(match.group(1)) if match else 0):
                    return answer
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            answer += data
    return answer


def test_a_body_far_beyond_the_limit_gets_413_and_then_the_connection_closes(
    server: RunningServer,
) -> None:
    head = (
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000\r\n\r\n"
    )
    answer = raw_exchange(server, head, b"x" * (5 << 20))
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /api/v1/jobs HTTP/9.9\r\n\r\n",
        b"GET /api/v1/jobs HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /api/v1/jobs HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /api/v1/jobs HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /api/v1/jobs HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /api/v1/jobs HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{",
        b"GET /api/v1/jobs/%ff%fe HTTP/1.1\r\n\r\n",
        b"GET /api/v1/jobs?limit=%ff HTTP/1.1\r\n\r\n",
        b"GET " + b"/x" * 40000 + b" HTTP/1.1\r\n\r\n",
        b"GET /api/v1/jobs HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
    ],
)
def test_malformed_http_never_gets_a_500_or_a_traceback(
    shared_server: RunningServer, request_bytes: bytes
) -> None:
    answer = raw_exchange(shared_server, request_bytes)
    status_line = answer.split(b"\r\n", 1)[0]
    assert not status_line.startswith(b"HTTP/1.1 500"), answer[:200]
    assert b"Traceback" not in shared_server.log_text().encode()


def test_a_chunked_create_is_understood(shared_server: RunningServer) -> None:
    body = f'{{"local_id": "{uuid.uuid4()}", "text": "chunked"}}'.encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    answer = raw_exchange(
        shared_server,
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks + b"0\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 201 ")


def test_unknown_paths_are_404_and_wrong_methods_405_with_allow(
    shared_server: RunningServer, client: requests.Session
) -> None:
    assert_error(client.get(f"{shared_server.url}/"), 404)
    assert_error(client.get(f"{shared_server.url}/api/v1/other"), 404)
    assert_error(client.get(f"{shared_server.jobs_url}/a/b"), 404)
    for method in ("PUT", "DELETE", "PATCH"):
        answer = client.request(method, shared_server.jobs_url)
        assert_error(answer, 405)
        assert answer.headers["Allow"] == "GET, POST"
    for method in ("PUT", "POST"):
        answer = client.request(method, f"{shared_server.jobs_url}/{uuid.uuid4()}")
        assert_error(answer, 405)
        assert answer.headers["Allow"] == "GET, PATCH, DELETE"


def test_no_request_above_produced_a_traceback(shared_server: RunningServer) -> None:
    assert "Traceback" not in shared_server.log_text()
    assert "internal error" not in shared_server.log_text()
