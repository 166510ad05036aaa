"""Listing pages, cursors and ETags: complete under concurrent changes, 304 when unchanged."""

from __future__ import annotations

import random
import threading
import uuid

import pytest
import requests
from serverproc import RunningServer, new_job


def list_all(session: requests.Session, url: str, limit: int | None = None) -> list[dict]:
    jobs: list[dict] = []
    cursor = None
    for _ in range(10_000):
        params: dict[str, object] = {}
        if limit:
            params["limit"] = limit
        if cursor:
            params["cursor"] = cursor
        answer = session.get(url, params=params)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            return jobs
    raise AssertionError("listing did not end")


def seed(session: requests.Session, url: str, count: int) -> list[dict]:
    return [new_job(session, url, text=f"job {i}") for i in range(count)]


def test_pages_follow_the_cursor_to_the_end_with_each_job_once(server: RunningServer) -> None:
    with server.session() as client:
        made = seed(client, server.jobs_url, 23)
        first = client.get(server.jobs_url, params={"limit": 10}).json()
        assert len(first["jobs"]) == 10
        assert isinstance(first["next_cursor"], str)
        listed = list_all(client, server.jobs_url, limit=10)
    assert [j["id"] for j in listed] == [j["id"] for j in made]


def test_a_limit_that_exactly_fills_the_last_page_ends_with_a_null_cursor(
    server: RunningServer,
) -> None:
    with server.session() as client:
        seed(client, server.jobs_url, 4)
        page = client.get(server.jobs_url, params={"limit": 4}).json()
    assert len(page["jobs"]) == 4
    assert page["next_cursor"] is None


@pytest.mark.sqlite_only
def test_limit_defaults_to_500_and_is_capped_at_5000(server: RunningServer) -> None:
    import sqlite3

    from jobsyncd.server.storage import utc_now

    with server.session() as client:
        new_job(client, server.jobs_url)  # the schema exists now
        # 5,100 jobs straight into the database (as the server would store them) keeps this fast.
        conn = sqlite3.connect(server.db)
        now = utc_now()
        with conn:
            conn.executemany(
                "INSERT INTO jobs (id, user, local_id, text, metadata, status, created_at,"
                " updated_at) VALUES (?, 'default', ?, 'x', '{}', 'submitted', ?, ?)",
                [(str(uuid.uuid4()), str(uuid.uuid4()), now, now) for _ in range(5100)],
            )
        conn.close()
        assert len(client.get(server.jobs_url).json()["jobs"]) == 500
        assert len(client.get(server.jobs_url, params={"limit": 99999}).json()["jobs"]) == 5000
        assert len(client.get(server.jobs_url, params={"limit": 5001}).json()["jobs"]) == 5000


def test_bad_limits_and_cursors_answer_400(server: RunningServer) -> None:
    with server.session() as client:
        seed(client, server.jobs_url, 3)
        cursor = client.get(server.jobs_url, params={"limit": 1}).json()["next_cursor"]
        for params in (
            {"limit": "0"},
            {"limit": "-1"},
            {"limit": "ten"},
            {"limit": "1.5"},
            {"cursor": "not-a-cursor"},
            {"cursor": cursor[:-1] + ("A" if cursor[-1] != "A" else "B")},
            {"cursor": "AAAAAAAAAAEAAAAAAAAAAAAAAAA"},
            {"cursor": "%%%"},
        ):
            answer = client.get(server.jobs_url, params=params)
            assert answer.status_code == 400, params
            assert "error" in answer.json()


def test_a_cursor_stays_valid_when_the_job_it_points_after_is_deleted(
    server: RunningServer,
) -> None:
    with server.session() as client:
        made = seed(client, server.jobs_url, 5)
        page = client.get(server.jobs_url, params={"limit": 2}).json()
        assert client.delete(f"{server.jobs_url}/{made[1]['id']}").status_code == 204
        rest = client.get(server.jobs_url, params={"cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [j["id"] for j in made[2:]]


def test_listing_under_concurrent_inserts_and_deletes_shows_every_lasting_job_once(
    server: RunningServer,
) -> None:
    with server.session() as client:
        lasting = {j["id"] for j in seed(client, server.jobs_url, 150)}
        doomed = [j["id"] for j in seed(client, server.jobs_url, 60)]
    random.Random(7).shuffle(doomed)
    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:
        with server.session() as session:
            for job_id in doomed:
                if stop.is_set():
                    break
                if session.delete(f"{server.jobs_url}/{job_id}").status_code != 204:
                    errors.append("delete failed")
                answer = session.post(server.jobs_url, json={"local_id": str(uuid.uuid4())})
                if answer.status_code != 201:
                    errors.append("create failed")

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        with server.session() as client:
            for _ in range(3):
                listed = [j["id"] for j in list_all(client, server.jobs_url, limit=7)]
                assert len(listed) == len(set(listed)), "a job appeared twice"
                assert lasting <= set(listed), "a job that existed throughout is missing"
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not errors


def test_if_none_match_with_the_current_etag_answers_304_without_a_body(
    server: RunningServer,
) -> None:
    with server.session() as client:
        new_job(client, server.jobs_url)
        etag = client.get(server.jobs_url).headers["ETag"]
        unchanged = client.get(server.jobs_url, headers={"If-None-Match": etag})
        assert unchanged.status_code == 304
        assert unchanged.content == b""
        assert unchanged.headers["ETag"] == etag
        assert client.get(server.jobs_url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_the_etag_changes_on_every_create_change_and_delete(server: RunningServer) -> None:
    with server.session() as client:
        seen = [client.get(server.jobs_url).headers["ETag"]]
        job = new_job(client, server.jobs_url)
        seen.append(client.get(server.jobs_url).headers["ETag"])
        client.patch(f"{server.jobs_url}/{job['id']}", json={"status": "done"})
        seen.append(client.get(server.jobs_url).headers["ETag"])
        client.post(server.jobs_url, json={"local_id": job["local_id"]})  # a repeat: no change
        seen.append(client.get(server.jobs_url).headers["ETag"])
        client.delete(f"{server.jobs_url}/{job['id']}")
        seen.append(client.get(server.jobs_url).headers["ETag"])
        stale = client.get(server.jobs_url, headers={"If-None-Match": seen[0]})
    assert len(set(seen)) == 4
    assert seen[2] == seen[3]
    assert stale.status_code == 200
