"""Resumable uploads wired into the reference server (contract 6.8 and 7): the installed
`jobsyncd-server` answers tus 1.0.0 at /api/v1/uploads, and a JSON POST or PATCH of a job
attaches a finished upload with `audio_upload` + `audio_filename`. Real server processes on
127.0.0.1, on each storage engine (conftest.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from serverproc import RunningServer, new_job

from jobsyncd.server.app import DEFAULT_USER
from jobsyncd.server.uploads import SUBDIR, UploadStore

TUS = {"Tus-Resumable": "1.0.0"}


def uploads_url(server: RunningServer) -> str:
    return f"{server.url}/api/v1/uploads"


def create_upload(
    session: requests.Session, server: RunningServer, length: int, filename: str = "take.wav"
) -> str:
    """A new upload's URL (its Location resolved against the creation URL)."""
    metadata = "filename " + base64.b64encode(filename.encode()).decode()
    answer = session.post(
        uploads_url(server),
        headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    return requests.compat.urljoin(uploads_url(server), answer.headers["Location"])


def send_chunk(session: requests.Session, url: str, offset: int, data: bytes) -> int:
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    answer = session.patch(
        url,
        data=data,
        headers={
            **TUS,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Upload-Checksum": f"sha256 {digest}",
        },
        timeout=10,
    )
    assert answer.status_code == 204, answer.text
    return int(answer.headers["Upload-Offset"])


def finished_upload(
    session: requests.Session, server: RunningServer, data: bytes, filename: str = "take.wav"
) -> str:
    """An upload of `data` sent in two chunks with sha256 checksums; its id."""
    url = create_upload(session, server, len(data), filename)
    half = len(data) // 2
    assert send_chunk(session, url, 0, data[:half]) == half
    assert send_chunk(session, url, half, data[half:]) == len(data)
    return url.rsplit("/", 1)[1]


def upload_status(session: requests.Session, server: RunningServer, upload_id: str) -> int:
    return session.head(f"{uploads_url(server)}/{upload_id}", headers=TUS, timeout=10).status_code


def post_job(
    session: requests.Session, server: RunningServer, **fields: object
) -> requests.Response:
    body = {"local_id": str(uuid.uuid4()), "text": "hello", "metadata": {}, **fields}
    return session.post(server.jobs_url, json=body, timeout=10)


@pytest.fixture
def alice(server: RunningServer) -> Iterator[requests.Session]:
    with server.session() as session:
        yield session


def test_an_upload_sent_in_two_chunks_is_attached_by_the_post_of_a_new_job(
    server: RunningServer, alice: requests.Session
) -> None:
    data = os.urandom(300_000)
    upload_id = finished_upload(alice, server, data)
    answer = post_job(alice, server, audio_upload=upload_id, audio_filename="dir/take.wav")
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert job["audio"] == {
        "filename": "take.wav",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert upload_status(alice, server, upload_id) == 404  # consumed
    stored = [p for p in server.audio_dir.iterdir() if p.is_file()]
    assert [p.read_bytes() == data for p in stored] == [True]
    fetched = alice.get(f"{server.jobs_url}/{job['id']}", timeout=10).json()
    assert fetched["audio"] == job["audio"]


def test_a_patch_attaches_another_finished_upload_and_replaces_the_audio_file(
    server: RunningServer, alice: requests.Session
) -> None:
    first = os.urandom(70_000)
    created = post_job(
        alice, server, audio_upload=finished_upload(alice, server, first), audio_filename="a.wav"
    ).json()
    etag = alice.get(server.jobs_url, timeout=10).headers["ETag"]
    second = os.urandom(90_000)
    upload_id = finished_upload(alice, server, second)
    answer = alice.patch(
        f"{server.jobs_url}/{created['id']}",
        json={"audio_upload": upload_id, "audio_filename": "b.wav", "text": "new"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["text"] == "new"
    assert job["audio"] == {
        "filename": "b.wav",
        "size": len(second),
        "sha256": hashlib.sha256(second).hexdigest(),
    }
    stored = [p.read_bytes() for p in server.audio_dir.iterdir() if p.is_file()]
    assert stored == [second]  # the replaced file is gone
    assert alice.get(server.jobs_url, timeout=10).headers["ETag"] != etag
    changes = alice.get(server.changes_url, timeout=10).json()["changes"]
    assert [c["audio"] for c in changes if c["id"] == job["id"]] == [job["audio"]]


def test_a_patch_with_audio_null_removes_the_audio_file_and_its_metadata(
    server: RunningServer, alice: requests.Session
) -> None:
    data = os.urandom(10_000)
    created = post_job(
        alice, server, audio_upload=finished_upload(alice, server, data), audio_filename="a.wav"
    ).json()
    etag = alice.get(server.jobs_url, timeout=10).headers["ETag"]
    answer = alice.patch(f"{server.jobs_url}/{created['id']}", json={"audio": None}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["audio"] is None
    assert [p for p in server.audio_dir.iterdir() if p.is_file()] == []
    assert alice.get(server.jobs_url, timeout=10).headers["ETag"] != etag


def test_a_repeated_post_of_a_stored_local_id_answers_the_job_and_leaves_the_upload(
    server: RunningServer, alice: requests.Session
) -> None:
    data = os.urandom(20_000)
    local_id = str(uuid.uuid4())
    first = post_job(
        alice,
        server,
        local_id=local_id,
        audio_upload=finished_upload(alice, server, data),
        audio_filename="a.wav",
    )
    assert first.status_code == 201
    another = finished_upload(alice, server, os.urandom(5_000))
    repeat = post_job(
        alice, server, local_id=local_id, audio_upload=another, audio_filename="b.wav"
    )
    assert repeat.status_code == 200, repeat.text
    assert repeat.json() == first.json()
    assert upload_status(alice, server, another) == 200  # still there, unconsumed


def test_a_repeated_post_whose_upload_the_first_consumed_answers_the_stored_job(
    server: RunningServer, alice: requests.Session
) -> None:
    """The agent's lost answer: the same POST again, naming the upload the first one took."""
    body = {
        "local_id": str(uuid.uuid4()),
        "text": "hi",
        "metadata": {},
        "audio_upload": finished_upload(alice, server, os.urandom(4_000)),
        "audio_filename": "a.wav",
    }
    first = alice.post(server.jobs_url, json=body, timeout=10)
    assert first.status_code == 201
    repeat = alice.post(server.jobs_url, json=body, timeout=10)
    assert repeat.status_code == 200, repeat.text
    assert repeat.json() == first.json()


@pytest.mark.parametrize(
    "fields",
    [
        {"audio_upload": "0" * 32},  # without audio_filename
        {"audio_filename": "a.wav"},  # without audio_upload
        {"audio_upload": 5, "audio_filename": "a.wav"},
        {"audio_upload": "0" * 32, "audio_filename": 7},
        {"audio_upload": "0" * 32, "audio_filename": "a.wav"},  # unknown
        {"audio_upload": "../../jobs.sqlite3", "audio_filename": "a.wav"},
    ],
)
def test_a_post_naming_no_usable_upload_is_422_and_stores_nothing(
    server: RunningServer, alice: requests.Session, fields: dict[str, object]
) -> None:
    answer = post_job(alice, server, **fields)
    assert answer.status_code == 422, answer.text
    assert "error" in answer.json()
    assert alice.get(server.jobs_url, timeout=10).json()["jobs"] == []


def test_an_unfinished_upload_is_422_and_stays_resumable(
    server: RunningServer, alice: requests.Session
) -> None:
    url = create_upload(alice, server, 1000)
    send_chunk(alice, url, 0, b"x" * 400)
    upload_id = url.rsplit("/", 1)[1]
    answer = post_job(alice, server, audio_upload=upload_id, audio_filename="a.wav")
    assert answer.status_code == 422, answer.text
    assert alice.get(server.jobs_url, timeout=10).json()["jobs"] == []
    assert send_chunk(alice, url, 400, b"y" * 600) == 1000


def test_a_patch_with_audio_null_and_an_upload_together_is_422_and_changes_nothing(
    server: RunningServer, alice: requests.Session
) -> None:
    job = new_job(alice, server.jobs_url)
    upload_id = finished_upload(alice, server, b"abcd" * 100)
    for fields in (
        {"audio": None, "audio_upload": upload_id, "audio_filename": "a.wav"},
        {"audio": "x.wav"},
        {"audio_upload": upload_id},
    ):
        answer = alice.patch(f"{server.jobs_url}/{job['id']}", json=fields, timeout=10)
        assert answer.status_code == 422, (fields, answer.text)
    assert alice.get(f"{server.jobs_url}/{job['id']}", timeout=10).json() == job
    assert upload_status(alice, server, upload_id) == 200


def test_a_batch_operation_naming_an_upload_is_422(
    server: RunningServer, alice: requests.Session
) -> None:
    upload_id = finished_upload(alice, server, b"z" * 100)
    operation = {
        "op": "create",
        "local_id": str(uuid.uuid4()),
        "text": "t",
        "metadata": {},
        "audio_upload": upload_id,
        "audio_filename": "a.wav",
    }
    answer = alice.post(f"{server.url}/api/v1/batch", json={"operations": [operation]}, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["results"][0]["status"] == 422
    assert upload_status(alice, server, upload_id) == 200


def test_a_batch_update_with_audio_null_removes_the_audio_as_its_own_patch_would(
    server: RunningServer, alice: requests.Session
) -> None:
    """The agent sends `update --no-audio` in a batch when the push carries no file."""
    data = os.urandom(3_000)
    created = post_job(
        alice, server, audio_upload=finished_upload(alice, server, data), audio_filename="a.wav"
    ).json()
    upload_id = finished_upload(alice, server, b"u" * 300)
    operations = [
        {"op": "update", "id": created["id"], "fields": {"audio": None, "text": "no audio"}},
        {"op": "update", "id": created["id"], "fields": {"audio": "x.wav"}},
        {
            "op": "update",
            "id": created["id"],
            "fields": {"audio_upload": upload_id, "audio_filename": "b.wav"},
        },
    ]
    answer = alice.post(f"{server.url}/api/v1/batch", json={"operations": operations}, timeout=10)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["status"] for r in results] == [200, 422, 422]
    assert results[0]["job"]["audio"] is None
    assert results[0]["job"]["text"] == "no audio"
    assert [p for p in server.audio_dir.iterdir() if p.is_file()] == []
    assert upload_status(alice, server, upload_id) == 200


def token_server(
    server_factory: Callable[..., RunningServer], tmp_path: Path, max_bytes: int | None = None
) -> RunningServer:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice tok-alice\nbob tok-bob\n")
    tokens.chmod(0o600)
    args = ["--token-file", str(tokens)]
    if max_bytes is not None:
        args += ["--max-upload-bytes", str(max_bytes)]
    return server_factory(*args)


def test_another_users_upload_is_422_for_a_job_and_404_for_tus(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = token_server(server_factory, tmp_path)
    with server.session("tok-alice") as alice, server.session("tok-bob") as bob:
        upload_id = finished_upload(alice, server, b"q" * 1000)
        answer = post_job(bob, server, audio_upload=upload_id, audio_filename="a.wav")
        assert answer.status_code == 422, answer.text
        assert upload_status(bob, server, upload_id) == 404
        assert upload_status(alice, server, upload_id) == 200
        assert bob.get(server.jobs_url, timeout=10).json()["jobs"] == []


def test_options_answers_without_a_token_and_other_methods_need_one(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = token_server(server_factory, tmp_path, max_bytes=123_456)
    offer = requests.options(uploads_url(server), timeout=10)
    assert offer.status_code == 204
    assert offer.headers["Tus-Version"] == "1.0.0"
    assert offer.headers["Tus-Max-Size"] == "123456"
    assert "sha256" in offer.headers["Tus-Checksum-Algorithm"].split(",")
    anonymous = requests.post(
        uploads_url(server), headers={**TUS, "Upload-Length": "10"}, timeout=10
    )
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    with server.session("wrong") as wrong:
        chunk = wrong.patch(
            f"{uploads_url(server)}/{'0' * 32}",
            data=b"x" * 50_000,
            headers={
                **TUS,
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
            },
            timeout=10,
        )
        assert chunk.status_code == 401
    with server.session("tok-alice") as alice:
        too_big = alice.post(
            uploads_url(server), headers={**TUS, "Upload-Length": "123457"}, timeout=10
        )
        assert too_big.status_code == 413
        assert create_upload(alice, server, 123_456)
    assert list((server.audio_dir / SUBDIR).glob("*.json")) != []


def test_expired_uploads_are_removed_when_the_server_starts(
    server_factory: Callable[..., RunningServer], tmp_path: Path
) -> None:
    first = server_factory()
    with first.session() as session:
        fresh = create_upload(session, first, 100).rsplit("/", 1)[1]
    first.stop()
    # One created 25 h ago, by the same store in the same audio dir.
    yesterday = UploadStore(first.audio_dir, 1 << 20, clock=lambda: time.time() - 25 * 3600)
    old = yesterday.create(DEFAULT_USER, 100).id
    sidecar = first.audio_dir / SUBDIR / f"{old}.json"
    assert sidecar.exists()
    second = server_factory()
    assert not sidecar.exists()
    assert not (first.audio_dir / SUBDIR / old).exists()
    with second.session() as session:
        assert upload_status(session, second, old) == 404
        assert upload_status(session, second, fresh) == 200
