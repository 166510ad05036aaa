"""Every row of the API table (contract section 7) against a live jobsyncd-server."""

from __future__ import annotations

import hashlib
import re
import time
import uuid

import requests
from serverproc import RunningServer, new_job

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
JOB_KEYS = {"id", "local_id", "text", "metadata", "status", "audio", "created_at", "updated_at"}


def test_post_json_creates_a_submitted_job_with_the_contract_shape(
    shared_server: RunningServer, client: requests.Session
) -> None:
    local_id = str(uuid.uuid4())
    answer = client.post(
        shared_server.jobs_url,
        json={"local_id": local_id, "text": "dictation", "metadata": {"a": [1, 2]}},
    )
    assert answer.status_code == 201
    assert answer.headers["Content-Type"] == "application/json"
    job = answer.json()
    assert set(job) == JOB_KEYS
    assert isinstance(job["id"], str) and job["id"]
    assert job["local_id"] == local_id
    assert job["text"] == "dictation"
    assert job["metadata"] == {"a": [1, 2]}
    assert job["status"] == "submitted"
    assert job["audio"] is None
    assert TIMESTAMP.fullmatch(job["created_at"]) and TIMESTAMP.fullmatch(job["updated_at"])


def test_post_defaults_text_to_null_and_metadata_to_an_empty_object(
    shared_server: RunningServer, client: requests.Session
) -> None:
    answer = client.post(shared_server.jobs_url, json={"local_id": str(uuid.uuid4())})
    assert answer.status_code == 201
    assert answer.json()["text"] is None
    assert answer.json()["metadata"] == {}


def test_post_multipart_stores_audio_under_a_server_chosen_name(
    shared_server: RunningServer, client: requests.Session
) -> None:
    audio = bytes(range(256)) * 1000
    answer = client.post(
        shared_server.jobs_url,
        data={"local_id": str(uuid.uuid4()), "text": "with audio", "metadata": '{"k": "v"}'},
        files={"audio": ("../../evil name.wav", audio, "audio/wav")},
    )
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert job["metadata"] == {"k": "v"}
    assert job["text"] == "with audio"
    assert job["audio"] == {
        "filename": "evil name.wav",
        "size": len(audio),
        "sha256": hashlib.sha256(audio).hexdigest(),
    }
    stored = [p for p in shared_server.audio_dir.iterdir() if p.is_file()]
    assert any(p.read_bytes() == audio for p in stored)
    assert all("evil" not in p.name for p in shared_server.audio_dir.rglob("*"))


def test_get_one_job_answers_it_and_an_unknown_id_404(
    shared_server: RunningServer, client: requests.Session
) -> None:
    job = new_job(client, shared_server.jobs_url)
    answer = client.get(f"{shared_server.jobs_url}/{job['id']}")
    assert answer.status_code == 200
    assert answer.json() == job
    missing = client.get(f"{shared_server.jobs_url}/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.headers["Content-Type"] == "application/json"
    assert "error" in missing.json()


def test_list_answers_jobs_oldest_first_with_an_etag(server: RunningServer) -> None:
    with server.session() as client:
        made = [new_job(client, server.jobs_url, text=f"job {i}") for i in range(3)]
        answer = client.get(server.jobs_url)
    assert answer.status_code == 200
    assert answer.headers["ETag"]
    assert answer.json() == {"jobs": made, "next_cursor": None}


def test_patch_json_changes_only_the_given_fields(
    shared_server: RunningServer, client: requests.Session
) -> None:
    job = new_job(client, shared_server.jobs_url, metadata={"old": 1})
    url = f"{shared_server.jobs_url}/{job['id']}"
    answer = client.patch(url, json={"metadata": {"new": 2}, "status": "transcribed"})
    assert answer.status_code == 200
    changed = answer.json()
    assert changed["metadata"] == {"new": 2}
    assert changed["status"] == "transcribed"
    assert changed["text"] == job["text"]
    assert changed["updated_at"] >= job["updated_at"]
    assert client.patch(url, json={"text": None}).json()["text"] is None
    assert client.get(url).json()["metadata"] == {"new": 2}


def test_patch_multipart_replaces_the_audio_and_removes_the_old_file(
    shared_server: RunningServer, client: requests.Session
) -> None:
    first, second = b"first audio" * 100, b"second audio" * 100
    created = client.post(
        shared_server.jobs_url,
        data={"local_id": str(uuid.uuid4())},
        files={"audio": ("a.wav", first)},
    ).json()
    answer = client.patch(
        f"{shared_server.jobs_url}/{created['id']}",
        data={"text": "new text"},
        files={"audio": ("b.wav", second)},
    )
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["text"] == "new text"
    assert job["audio"]["filename"] == "b.wav"
    assert job["audio"]["sha256"] == hashlib.sha256(second).hexdigest()
    contents = [p.read_bytes() for p in shared_server.audio_dir.iterdir() if p.is_file()]
    assert second in contents
    assert first not in contents


def test_patch_of_an_unknown_job_is_404(
    shared_server: RunningServer, client: requests.Session
) -> None:
    answer = client.patch(f"{shared_server.jobs_url}/{uuid.uuid4()}", json={"text": "x"})
    assert answer.status_code == 404


def test_delete_answers_204_then_404_and_removes_the_audio(
    shared_server: RunningServer, client: requests.Session
) -> None:
    audio = uuid.uuid4().bytes * 50
    job = client.post(
        shared_server.jobs_url,
        data={"local_id": str(uuid.uuid4())},
        files={"audio": ("x.wav", audio)},
    ).json()
    url = f"{shared_server.jobs_url}/{job['id']}"
    answer = client.delete(url)
    assert answer.status_code == 204
    assert answer.content == b""
    assert client.get(url).status_code == 404
    assert client.delete(url).status_code == 404
    assert all(p.read_bytes() != audio for p in shared_server.audio_dir.iterdir() if p.is_file())


def test_keep_alive_serves_many_requests_on_one_connection(
    shared_server: RunningServer, client: requests.Session
) -> None:
    for _ in range(20):
        answer = client.get(shared_server.jobs_url, params={"limit": 1}, stream=False)
        assert answer.status_code == 200
        assert answer.headers.get("Connection", "").lower() != "close"
        assert answer.raw.version == 11


def test_every_request_is_logged_on_one_stderr_line(
    shared_server: RunningServer, client: requests.Session
) -> None:
    marker = uuid.uuid4().hex
    client.get(f"{shared_server.url}/api/v1/jobs/{marker}")
    deadline = time.monotonic() + 10  # the line is written just after the answer
    lines: list[str] = []
    while not lines and time.monotonic() < deadline:
        lines = [line for line in shared_server.log_text().splitlines() if marker in line]
        time.sleep(0.01)
    assert len(lines) == 1
    assert "404" in lines[0]
