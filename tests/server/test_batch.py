"""POST /api/v1/batch on each engine (contract section 7): each operation answered as its own
request would be, one failing never undoing another, the change log and ETag kept right."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import requests
from serverproc import RunningServer, new_job


def batch_url(server: RunningServer) -> str:
    return f"{server.url}/api/v1/batch"


INFINITE = 10.0**308 * 10  # sent as 1e999: JSON that reads as infinity


def send(client: requests.Session, server: RunningServer, operations: list[Any]) -> list[dict]:
    body = json.dumps({"operations": operations}).replace("Infinity", "1e999")
    answer = client.post(
        batch_url(server), data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == len(operations)
    return results


def single(client: requests.Session, server: RunningServer, operation: dict) -> tuple[int, Any]:
    """The same operation as its own request."""
    if operation.get("op") == "create":
        body = {k: v for k, v in operation.items() if k != "op"}
        answer = client.post(server.jobs_url, json=body)
    elif operation.get("op") == "update":
        answer = client.patch(f"{server.jobs_url}/{operation['id']}", json=operation["fields"])
    else:
        answer = client.delete(f"{server.jobs_url}/{operation['id']}")
    return answer.status_code, (answer.json() if answer.content else None)


def comparable(job: dict | None) -> Any:
    if job is None:
        return None
    return {k: v for k, v in job.items() if k not in ("id", "created_at", "updated_at")}


def test_a_mixed_batch_answers_each_operation_as_its_own_request_would(
    server: RunningServer,
) -> None:
    with server.session() as client:
        repeated = str(uuid.uuid4())
        twice = str(uuid.uuid4())
        before = [new_job(client, server.jobs_url, local_id=repeated)]
        before += [new_job(client, server.jobs_url) for _ in range(3)]
        with_single = [new_job(client, server.jobs_url) for _ in range(3)]

        def operations(jobs: list[dict]) -> list[Any]:
            return [
                {"op": "create", "local_id": twice, "text": "a", "metadata": {"n": 1}},
                {"op": "create", "local_id": repeated, "text": "ignored"},
                {"op": "create", "local_id": twice, "text": "again"},
                {"op": "create", "local_id": "not-a-uuid"},
                {"op": "create", "local_id": str(uuid.uuid4()), "metadata": {"x": INFINITE}},
                {"op": "create", "local_id": str(uuid.uuid4()), "text": "\udc00"},
                {"op": "update", "id": jobs[1]["id"], "fields": {"status": "done", "text": "t"}},
                {"op": "update", "id": jobs[2]["id"], "fields": {"metadata": []}},
                {"op": "update", "id": str(uuid.uuid4()), "fields": {"text": "x"}},
                {"op": "update", "id": jobs[2]["id"], "fields": {"colour": "red"}},
                {"op": "delete", "id": jobs[3]["id"]},
                {"op": "delete", "id": jobs[3]["id"]},
                {"op": "update", "id": jobs[3]["id"], "fields": {"text": "gone"}},
                {"op": "frobnicate"},
                "not an object",
            ]

        batched = send(client, server, operations(before))
        # The same operations one by one, on jobs in the same state (the creates' local_ids
        # are taken by now, so they answer as repeats: compare those separately below).
        singles = [single(client, server, op) for op in operations([before[0], *with_single])[6:13]]
    statuses = [r["status"] for r in batched]
    assert statuses == [201, 200, 200, 422, 422, 422, 200, 422, 404, 422, 204, 404, 404, 422, 422]
    assert [s for s, _ in singles] == statuses[6:13]
    assert comparable(batched[6]["job"]) == {
        **comparable(singles[0][1]),
        "local_id": before[1]["local_id"],
    }
    assert batched[0]["job"]["text"] == "a" and batched[2]["job"] == batched[0]["job"]
    assert batched[1]["job"] == before[0]
    for r in batched:
        assert (r["error"] is None) == (r["status"] < 400)
        assert (r["job"] is None) == (r["status"] in (204, 404, 413, 422))


def test_an_operation_over_1_mib_is_413_and_the_others_are_applied(server: RunningServer) -> None:
    big = {"op": "create", "local_id": str(uuid.uuid4()), "metadata": {"a": "x" * (1 << 20)}}
    small = {"op": "create", "local_id": str(uuid.uuid4())}
    with server.session() as client:
        results = send(client, server, [big, small])
        assert [r["status"] for r in results] == [413, 201]
        listed = client.get(server.jobs_url).json()["jobs"]
    assert [j["local_id"] for j in listed] == [small["local_id"]]


def test_an_empty_batch_answers_no_results(
    shared_server: RunningServer, client: requests.Session
) -> None:
    answer = client.post(batch_url(shared_server), json={"operations": []})
    assert answer.status_code == 200 and answer.json() == {"results": []}


def test_more_than_500_operations_or_8_mib_is_413_and_applies_nothing(
    server: RunningServer,
) -> None:
    with server.session() as client:
        many = [{"op": "create", "local_id": str(uuid.uuid4())} for _ in range(501)]
        assert client.post(batch_url(server), json={"operations": many}).status_code == 413
        huge = [{"op": "create", "local_id": str(uuid.uuid4()), "text": "x" * 900_000}] * 10
        assert client.post(batch_url(server), json={"operations": huge}).status_code == 413
        assert client.get(server.jobs_url).json()["jobs"] == []


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"{nope", 400), (b"[]", 400), (b'{"operations": 5}', 422), (b'{"ops": []}', 422)],
)
def test_a_malformed_batch_is_refused_whole(
    shared_server: RunningServer, client: requests.Session, body: bytes, status: int
) -> None:
    answer = client.post(
        batch_url(shared_server), data=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == status, answer.text


def test_other_methods_on_batch_are_405_with_allow(
    shared_server: RunningServer, client: requests.Session
) -> None:
    answer = client.get(batch_url(shared_server))
    assert answer.status_code == 405 and answer.headers["Allow"] == "POST"


def test_a_repeated_batch_creates_nothing_twice_and_leaves_the_etag(server: RunningServer) -> None:
    operations = [
        {"op": "create", "local_id": str(uuid.uuid4()), "text": f"{i}"} for i in range(20)
    ]
    with server.session() as client:
        first = send(client, server, operations)
        etag = client.get(server.jobs_url).headers["ETag"]
        again = send(client, server, operations)
        assert [r["status"] for r in first] == [201] * 20
        assert [r["status"] for r in again] == [200] * 20
        assert [r["job"] for r in again] == [r["job"] for r in first]
        assert client.get(server.jobs_url, headers={"If-None-Match": etag}).status_code == 304
        assert len(client.get(server.jobs_url).json()["jobs"]) == 20


def test_a_batch_s_changes_reach_the_feed_in_order_one_page_at_a_time(
    server: RunningServer,
) -> None:
    with server.session() as client:
        kept = new_job(client, server.jobs_url)
        doomed = new_job(client, server.jobs_url)
        start = client.get(f"{server.url}/api/v1/changes").json()
        results = send(
            client,
            server,
            [
                *({"op": "create", "local_id": str(uuid.uuid4())} for _ in range(4)),
                {"op": "update", "id": kept["id"], "fields": {"status": "done"}},
                {"op": "delete", "id": doomed["id"]},
            ],
        )
        seen: list[str] = []
        since = start["next"]
        for _ in range(20):
            page = client.get(
                f"{server.url}/api/v1/changes", params={"since": since, "limit": 1}
            ).json()
            seen += [change["id"] for change in page["changes"]]
            since = page["next"]
            if not page["more"]:
                break
    assert seen == [r["job"]["id"] for r in results[:5]] + [doomed["id"]]


def test_updates_of_one_job_twice_in_a_batch_apply_in_order_and_audio_null_removes_the_file(
    server: RunningServer,
) -> None:
    with server.session() as client:
        plain = new_job(client, server.jobs_url, text="plain")
        answer = client.post(
            server.jobs_url,
            data={"local_id": str(uuid.uuid4()), "text": "with audio"},
            files={"audio": ("a.wav", b"RIFF" + bytes(100), "audio/wav")},
        )
        assert answer.status_code == 201, answer.text
        voiced = answer.json()
        assert [p for p in server.audio_dir.iterdir() if p.is_file()]
        start = client.get(server.changes_url).json()
        before = int(client.get(server.jobs_url).headers["ETag"].strip('"').rsplit("-", 1)[1])
        results = send(
            client,
            server,
            [
                {"op": "update", "id": plain["id"], "fields": {"text": "one"}},
                {"op": "update", "id": voiced["id"], "fields": {"audio": None}},
                {"op": "update", "id": plain["id"], "fields": {"metadata": {"n": 2}}},
                {"op": "update", "id": plain["id"], "fields": {}},
                {"op": "update", "id": voiced["id"], "fields": {"audio": None, "status": "s"}},
            ],
        )
        assert [r["status"] for r in results] == [200] * 5
        assert results[0]["job"]["text"] == "one" and results[0]["job"]["metadata"] == {}
        assert (results[2]["job"]["text"], results[2]["job"]["metadata"]) == ("one", {"n": 2})
        assert results[3]["job"] == results[2]["job"]  # no change: answered as it stands
        assert results[1]["job"]["audio"] is None and results[4]["job"]["status"] == "s"
        assert client.get(f"{server.jobs_url}/{plain['id']}").json() == results[3]["job"]
        assert not [p for p in server.audio_dir.iterdir() if p.is_file()]
        changes = client.get(server.changes_url, params={"since": start["next"]}).json()
        assert [c["id"] for c in changes["changes"]] == [plain["id"], voiced["id"]]
        after = int(client.get(server.jobs_url).headers["ETag"].strip('"').rsplit("-", 1)[1])
        assert after == before + 4  # each change its own counter value; none for no change
