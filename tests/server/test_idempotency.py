"""A repeated create (same local_id) never makes a second job, even when repeats race."""

from __future__ import annotations

import threading
import uuid

import requests
from serverproc import RunningServer


def test_a_repeated_post_answers_200_with_the_existing_job_unchanged(
    shared_server: RunningServer, client: requests.Session
) -> None:
    local_id = str(uuid.uuid4())
    first = client.post(shared_server.jobs_url, json={"local_id": local_id, "text": "one"})
    again = client.post(
        shared_server.jobs_url, json={"local_id": local_id, "text": "two", "metadata": {"x": 1}}
    )
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json() == first.json()


def test_a_repeated_multipart_post_keeps_the_first_audio_and_stores_no_second_file(
    shared_server: RunningServer, client: requests.Session
) -> None:
    local_id = str(uuid.uuid4())
    first = client.post(
        shared_server.jobs_url, data={"local_id": local_id}, files={"audio": ("a", b"A" * 500)}
    )
    files_before = sorted(p.name for p in shared_server.audio_dir.iterdir() if p.is_file())
    again = client.post(
        shared_server.jobs_url, data={"local_id": local_id}, files={"audio": ("b", b"B" * 700)}
    )
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert sorted(p.name for p in shared_server.audio_dir.iterdir() if p.is_file()) == files_before


def test_concurrent_repeats_of_one_create_make_exactly_one_job(server: RunningServer) -> None:
    local_id = str(uuid.uuid4())
    barrier = threading.Barrier(8)
    answers: list[requests.Response] = []
    lock = threading.Lock()

    def post() -> None:
        with server.session() as session:
            session.get(server.jobs_url, params={"limit": 1})  # connect before the race
            barrier.wait(timeout=10)
            answer = session.post(server.jobs_url, json={"local_id": local_id, "text": "race"})
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 7 + [201]
    assert len({a.json()["id"] for a in answers}) == 1
    with server.session() as session:
        assert len(session.get(server.jobs_url).json()["jobs"]) == 1


def test_local_id_case_does_not_make_a_second_job(
    shared_server: RunningServer, client: requests.Session
) -> None:
    local_id = str(uuid.uuid4())
    first = client.post(shared_server.jobs_url, json={"local_id": local_id})
    again = client.post(shared_server.jobs_url, json={"local_id": local_id.upper()})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
