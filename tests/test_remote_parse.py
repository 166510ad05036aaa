"""remote.parse_server_job and the JSON decoding of answers (contract 6.4, 6.9): what makes a
job object invalid, how its timestamps are normalised, and that no answer, however hostile,
raises anything but the RemoteError kinds (no OverflowError, RecursionError, UnicodeError).
"""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from jobsyncd.remote import (
    InvalidJob,
    InvalidJobObject,
    Remote,
    ServerJob,
    Tombstone,
    Transient,
    Unchanged,
    _feed_item,
    parse_server_job,
)

LOCAL_ID = str(uuid.uuid4())


def job(**changes: Any) -> dict[str, Any]:
    obj = {
        "id": "42",
        "local_id": LOCAL_ID,
        "text": "hello",
        "metadata": {"a": [1, 2.5, {"b": None}]},
        "status": "submitted",
        "audio": None,
        "created_at": "2026-11-30T10:00:00Z",
        "updated_at": "2026-11-30T10:00:01.5+01:00",
    }
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not ...}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_a_valid_job_is_parsed_with_its_timestamps_in_our_utc_z_form():
    sj = parse_server_job(job())
    assert isinstance(sj, ServerJob)
    assert (sj.id, sj.local_id, sj.text, sj.status) == ("42", LOCAL_ID, "hello", "submitted")
    assert sj.created_at == "2026-11-30T10:00:00.000Z"
    assert sj.updated_at == "2026-11-30T09:00:01.500Z"


def test_an_integer_id_becomes_a_string_and_null_text_and_metadata_become_empty():
    sj = parse_server_job(job(id=7, text=None, metadata=None, created_at=None, updated_at=...))
    assert (sj.id, sj.text, sj.metadata, sj.created_at, sj.updated_at) == ("7", "", {}, None, None)


def test_metadata_nested_32_levels_is_kept():
    assert parse_server_job(job(metadata=nested(32))).metadata == nested(32)


@pytest.mark.parametrize(
    "changes",
    [
        {"text": 5},
        {"text": "bad \ud800 surrogate"},
        {"metadata": []},
        {"metadata": {"k": "\udfff"}},
        {"metadata": {"\ud800": 1}},
        {"metadata": nested(33)},
        {"metadata": {"k": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}},
        {"metadata": {"n": float("inf")}},
        {"metadata": {"n": float("nan")}},
        {"metadata": {"n": 10**400}},
        {"status": 3},
        {"status": "\ud800"},
        {"local_id": ["x"]},
        {"local_id": "\ud800"},
        {"audio": "file.wav"},
        {"audio": {"size": float("inf")}},
        {"created_at": "0001-01-01T00:00:00+01:00"},
        {"created_at": "1969-12-31T23:59:59Z"},
        {"created_at": "1970-01-01T00:30:00+01:00"},
        {"updated_at": "9999-12-31T23:00:00-02:00"},
        {"updated_at": "10000-01-01T00:00:00Z"},
        {"updated_at": "2026-11-30"},
        {"updated_at": "2026-11-30T10:00:00"},
        {"updated_at": "20261130T100000Z"},
        {"updated_at": "2026-02-30T10:00:00Z"},
        {"updated_at": "2026-11-30T25:00:00Z"},
        {"updated_at": "2026-11-30T10:00:00+24:00"},
        {"updated_at": 1764496800},
    ],
)
def test_an_invalid_job_raises_invalid_job_object_naming_its_id(changes):
    with pytest.raises(InvalidJobObject) as caught:
        parse_server_job(job(**changes))
    assert isinstance(caught.value, Transient)
    assert caught.value.server_id == "42"
    assert caught.value.reason
    assert "'42'" in str(caught.value) and caught.value.reason in str(caught.value)


@pytest.mark.parametrize("bad_id", [None, "", True, 1.5, "a\nb", "\ud800", "x" * 257, ["42"]])
def test_a_job_without_a_usable_id_is_invalid_with_no_id(bad_id):
    with pytest.raises(InvalidJobObject) as caught:
        parse_server_job(job(id=bad_id))
    assert caught.value.server_id is None


def test_a_job_that_is_not_an_object_is_invalid():
    with pytest.raises(InvalidJobObject):
        parse_server_job(["id", "42"])


def test_the_year_9999_and_a_leap_second_are_accepted():
    sj = parse_server_job(job(created_at="9999-12-31T23:59:60Z", updated_at="1970-01-01T00:00:00Z"))
    assert sj.created_at == "9999-12-31T23:59:59.999Z"
    assert sj.updated_at == "1970-01-01T00:00:00.000Z"


def test_invalid_job_is_a_frozen_record():
    bad = InvalidJob("42", None, "why")
    with pytest.raises(AttributeError):
        bad.id = "43"  # type: ignore[misc]


# ---- the decoding of answers ------------------------------------------------------------------


def decode(body: bytes) -> Any:
    remote = Remote("http://127.0.0.1:9/api/v1")
    try:
        response = SimpleNamespace(headers={"Content-Type": "application/json"})
        return remote._json(response, body, "GET", "/jobs")  # type: ignore[arg-type]
    finally:
        remote.close()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe junk",
    ],
)
def test_junk_answers_are_transient_never_a_crash(body):
    with pytest.raises(Transient):
        decode(body)


def test_a_huge_number_decodes_to_something_that_makes_its_job_invalid():
    for literal in (b"1e999", b"-1e999", b"1" + b"0" * 5000, b"NaN", b"Infinity", b"-Infinity"):
        obj = decode(b'{"id": "42", "metadata": {"n": ' + literal + b"}}")
        with pytest.raises(InvalidJobObject) as caught:
            parse_server_job(obj)
        assert "double range" in caught.value.reason


def test_a_strict_json_dump_of_a_parsed_job_never_fails():
    obj = decode(json.dumps(job(metadata={"x": 1e308, "y": -(2**60), "z": "é"})).encode())
    sj = parse_server_job(obj)
    json.dumps(sj.metadata, allow_nan=False).encode("utf-8")


# ---- a feed item the agent holds as it is (Unchanged) ----------------------------------------


def _held_as_is(obj: dict[str, Any]) -> bool:
    return obj.get("id") == "42" and obj.get("text") == "hello"  # what the pull's test compares


@pytest.mark.parametrize(
    "changes",
    [{}, {"audio": {"sha256": "ab", "size": 3}}, {"created_at": None}, {"updated_at": ...}],
    ids=["as listed", "with audio", "null created_at", "no updated_at"],
)
def test_a_feed_item_held_as_it_is_and_valid_is_unchanged_not_parsed(changes):
    item = _feed_item(job(**changes), parse_server_job, _held_as_is)
    assert item == Unchanged("42")


@pytest.mark.parametrize(
    "changes",
    [
        {"updated_at": "yesterday"},
        {"created_at": 5},
        {"updated_at": "0999-01-01T00:00:00Z"},
        {"audio": "a.wav"},
        {"audio": {"name": "\ud800"}},
        {"audio": {"size": float("inf")}},
    ],
    ids=["bad timestamp", "number timestamp", "year 999", "audio string", "surrogate", "inf"],
)
def test_a_feed_item_held_as_it_is_but_invalid_elsewhere_is_still_invalid(changes):
    """Text, metadata and status equal to the held job's do not make an invalid object valid:
    it is skipped with its warning as ever (contract 6.4)."""
    item = _feed_item(job(**changes), parse_server_job, _held_as_is)
    assert isinstance(item, InvalidJob) and item.id == "42"


def test_a_feed_item_not_held_as_it_is_is_parsed_and_a_tombstone_stays_a_tombstone():
    assert isinstance(_feed_item(job(text="changed"), parse_server_job, _held_as_is), ServerJob)
    assert _feed_item(job(), parse_server_job, None) == parse_server_job(job())
    tombstone = {"id": "42", "local_id": LOCAL_ID, "deleted": True, "text": "hello"}
    assert _feed_item(tombstone, parse_server_job, _held_as_is) == Tombstone("42", LOCAL_ID)


def test_a_held_feed_item_whose_id_holds_the_token_is_never_kept(monkeypatch):
    """The remote's own check of ids (a token in one is never stored) still comes first."""
    remote = Remote("http://127.0.0.1:9/api/v1", token="42")
    try:
        body = json.dumps({"changes": [job()], "next": "c1", "more": False}).encode()
        answer = SimpleNamespace(status_code=200, headers={"Content-Type": "application/json"})
        monkeypatch.setattr(remote, "_send", lambda *a, **k: (answer, body))
        monkeypatch.setattr(remote, "_check_status", lambda *a, **k: None)
        (item,) = remote.changes(None, 10, 0, _held_as_is).items
    finally:
        remote.close()
    assert isinstance(item, InvalidJob)
