"""The server stores nothing a strict client cannot read back (contract section 7): each poison
is refused with 422 on every way in (JSON create, JSON change, multipart), nothing is stored, and
what the server serves stays strict JSON (RFC 8259, valid UTF-8)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import requests
from serverproc import RunningServer, new_job

DEEP_BAD = '{"a":' * 32 + "{}" + "}" * 32  # 33 levels, the metadata object included
DEEP_LIST_BAD = '{"a":' + "[" * 32 + "]" * 32 + "}"  # arrays count as levels too
BIG = '{"a":"' + "x" * (1 << 20) + '"}'

# Metadata texts (as they would appear in the body) that must be refused with 422.
POISONED_METADATA = {
    "an infinite number": '{"n": 1e999}',
    "a negative infinite number": '{"n": -1e999}',
    "an integer beyond any double": '{"n": 1' + "0" * 400 + "}",
    "a lone surrogate in a value": '{"k": "\\ud800"}',
    "a lone surrogate in a key": '{"\\udc00": 1}',
    "a lone surrogate deep inside": '{"k": [{"j": ["ok", "\\udfff"]}]}',
    "33 levels of objects": DEEP_BAD,
    "33 levels with arrays": DEEP_LIST_BAD,
}


def strict_loads(data: bytes) -> Any:
    """What a strict client does: UTF-8 without surrogates, no NaN/Infinity, finite numbers."""

    def refuse(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name}")

    def finite(text: str) -> float:
        value = float(text)
        assert value not in (float("inf"), float("-inf")), text
        return value

    return json.loads(data.decode("utf-8", "strict"), parse_constant=refuse, parse_float=finite)


def assert_served_strictly(client: requests.Session, server: RunningServer) -> list[Any]:
    answer = client.get(server.jobs_url)
    assert answer.status_code == 200
    document = strict_loads(answer.content)
    # A lone surrogate written as a \\u escape survives a UTF-8 decode: look at every string.
    text = json.dumps(document, ensure_ascii=False)
    text.encode("utf-8")
    return document["jobs"]


@pytest.mark.parametrize("metadata", POISONED_METADATA.values(), ids=POISONED_METADATA.keys())
def test_a_create_with_poisoned_metadata_is_422_and_stores_nothing(
    server: RunningServer, metadata: str
) -> None:
    body = f'{{"local_id": "{uuid.uuid4()}", "text": "t", "metadata": {metadata}}}'
    with server.session() as client:
        answer = client.post(
            server.jobs_url, data=body.encode(), headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 422, answer.text
        assert isinstance(answer.json()["error"], str)
        assert assert_served_strictly(client, server) == []


@pytest.mark.parametrize("metadata", POISONED_METADATA.values(), ids=POISONED_METADATA.keys())
def test_a_change_with_poisoned_metadata_is_422_and_changes_nothing(
    shared_server: RunningServer, client: requests.Session, metadata: str
) -> None:
    job = new_job(client, shared_server.jobs_url)
    url = f"{shared_server.jobs_url}/{job['id']}"
    answer = client.patch(
        url, data=f'{{"metadata": {metadata}}}', headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 422, answer.text
    assert strict_loads(client.get(url).content) == job


@pytest.mark.parametrize("metadata", POISONED_METADATA.values(), ids=POISONED_METADATA.keys())
def test_a_multipart_create_with_poisoned_metadata_is_422_and_stores_no_audio(
    server: RunningServer, metadata: str
) -> None:
    with server.session() as client:
        answer = client.post(
            server.jobs_url,
            data={"local_id": str(uuid.uuid4()), "metadata": metadata},
            files={"audio": ("a.wav", b"x" * 3000)},
        )
        assert answer.status_code == 422, answer.text
        assert assert_served_strictly(client, server) == []
    assert [p for p in server.audio_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    "field",
    ['"text": "\\udbff"', '"text": "a\\udc00b"'],
    ids=["a lone high surrogate", "a lone low surrogate"],
)
def test_a_text_with_a_lone_surrogate_is_422_on_create_and_change(
    shared_server: RunningServer, client: requests.Session, field: str
) -> None:
    headers = {"Content-Type": "application/json"}
    body = f'{{"local_id": "{uuid.uuid4()}", {field}}}'
    assert client.post(shared_server.jobs_url, data=body, headers=headers).status_code == 422
    job = new_job(client, shared_server.jobs_url)
    url = f"{shared_server.jobs_url}/{job['id']}"
    assert client.patch(url, data=f"{{{field}}}", headers=headers).status_code == 422
    status = '{"status": "\\ud83d"}'
    assert client.patch(url, data=status, headers=headers).status_code == 422
    assert strict_loads(client.get(url).content) == job


def nested(levels: int) -> dict[str, Any]:
    """Metadata of exactly `levels` levels, the metadata object itself being level 1."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_metadata_of_exactly_32_levels_and_a_valid_surrogate_pair_are_stored(
    shared_server: RunningServer, client: requests.Session
) -> None:
    metadata = {**nested(32), "n": 1.5e300, "i": -7}
    body = {"local_id": str(uuid.uuid4()), "text": "\U0001f600", "metadata": metadata}
    answer = client.post(shared_server.jobs_url, json=body)
    assert answer.status_code == 201, answer.text
    job = strict_loads(answer.content)
    assert job["text"] == "\U0001f600"
    assert job["metadata"] == metadata


def test_metadata_of_33_levels_is_refused(
    shared_server: RunningServer, client: requests.Session
) -> None:
    body = {"local_id": str(uuid.uuid4()), "metadata": nested(33)}
    answer = client.post(shared_server.jobs_url, json=body)
    assert answer.status_code == 422, answer.text


def test_a_multipart_metadata_field_over_1_mib_is_422_and_stores_nothing(
    server: RunningServer,
) -> None:
    with server.session() as client:
        answer = client.post(
            server.jobs_url,
            data={"local_id": str(uuid.uuid4()), "metadata": BIG},
            files={"audio": ("a.wav", b"x" * 100)},
        )
        assert answer.status_code == 422, answer.text
        assert "metadata" in answer.json()["error"]
        assert assert_served_strictly(client, server) == []
    assert [p for p in server.audio_dir.rglob("*") if p.is_file()] == []


def test_a_json_body_over_1_mib_stays_413(server: RunningServer) -> None:
    body = f'{{"local_id": "{uuid.uuid4()}", "metadata": {BIG}}}'
    with server.session() as client:
        answer = client.post(
            server.jobs_url, data=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 413, answer.text
        assert assert_served_strictly(client, server) == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_are_refused_as_malformed_json(
    server: RunningServer, literal: str
) -> None:
    body = f'{{"local_id": "{uuid.uuid4()}", "metadata": {{"x": {literal}}}}}'
    with server.session() as client:
        answer = client.post(
            server.jobs_url, data=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 400, answer.text
        assert assert_served_strictly(client, server) == []
