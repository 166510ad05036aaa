"""Pure helpers of jobsyncd.model: --meta parsing, timestamps, backoff, UUID checks."""

from __future__ import annotations

import datetime as dt
import random
import re
import uuid

import pytest

from jobsyncd.model import (
    PUBLIC_KEYS,
    Job,
    backoff_delay,
    is_uuid,
    new_local_id,
    parse_meta,
    parse_rfc3339,
    rfc3339,
    utc_now,
)

RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("n=3", ("n", 3)),
        ("f=2.5", ("f", 2.5)),
        ("b=true", ("b", True)),
        ("z=null", ("z", None)),
        ("o={\"a\": [1, 2]}", ("o", {"a": [1, 2]})),
        ("l=[1,\"x\"]", ("l", [1, "x"])),
        ("s=\"quoted\"", ("s", "quoted")),
        ("word=hello", ("word", "hello")),
        ("k=", ("k", "")),
        ("url=a=b=c", ("url", "a=b=c")),
        ("eq==1", ("eq", "=1")),
        ("spaces=hello world", ("spaces", "hello world")),
        ("brace={not json", ("brace", "{not json")),
    ],
)
def test_parse_meta_splits_at_the_first_equals_and_reads_json_when_it_parses(pair, expected):
    assert parse_meta(pair) == expected


def test_parse_meta_keeps_the_type_of_a_json_number():
    key, value = parse_meta("n=3")
    assert type(value) is int
    key, value = parse_meta("n=3.0")
    assert type(value) is float


@pytest.mark.parametrize("pair", ["novalue", "", "key"])
def test_parse_meta_without_an_equals_sign_is_an_error(pair):
    with pytest.raises(ValueError):
        parse_meta(pair)


def test_parse_meta_with_an_empty_key_is_an_error():
    with pytest.raises(ValueError):
        parse_meta("=3")


def test_rfc3339_is_utc_and_ends_with_z():
    text = rfc3339(dt.datetime(2026, 11, 23, 18, 2, 29, 123456, tzinfo=dt.timezone.utc))
    assert text == "2026-11-23T18:02:29.123Z"
    assert RFC3339_Z.match(rfc3339(utc_now()))


def test_rfc3339_converts_another_timezone_to_utc():
    plus_two = dt.timezone(dt.timedelta(hours=2))
    text = rfc3339(dt.datetime(2026, 1, 1, 1, 30, 0, tzinfo=plus_two))
    assert text == "2025-12-31T23:30:00.000Z"


def test_rfc3339_round_trips_through_parse_rfc3339():
    now = utc_now().replace(microsecond=456000)
    assert parse_rfc3339(rfc3339(now)) == now


@pytest.mark.parametrize("retries", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("base", [15, 0.5, 1])
def test_backoff_delay_lies_between_half_and_all_of_the_nominal_delay(base, retries):
    nominal = base * 2 ** (retries - 1)
    rng = random.Random(1234)
    delays = [backoff_delay(base, retries, rng) for _ in range(500)]
    assert all(nominal / 2 <= d <= nominal for d in delays)
    # Jittered: not all the same, and spread over the range.
    assert max(delays) - min(delays) > nominal / 4


def test_backoff_delay_at_the_bounds_of_the_random_draw():
    class Fixed(random.Random):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def random(self):
            return self.value

    assert backoff_delay(10, 3, Fixed(0.0)) == pytest.approx(20)
    assert backoff_delay(10, 3, Fixed(0.999999)) == pytest.approx(40, rel=1e-5)


@pytest.mark.parametrize("retries", [0, 1, 4, 50])
def test_backoff_delay_with_a_zero_base_is_zero(retries):
    assert backoff_delay(0, retries) == 0


def test_backoff_delay_stays_finite_for_huge_retry_counts():
    delay = backoff_delay(15, 10_000)
    assert 0 < delay < float("inf")


def test_is_uuid_accepts_canonical_uuids():
    assert is_uuid(str(uuid.uuid4()))
    assert is_uuid(new_local_id())
    assert is_uuid(str(uuid.uuid4()).upper())


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        "not-a-uuid",
        "12345678123456781234567812345678",  # no hyphens
        "{12345678-1234-5678-1234-567812345678}",
        "urn:uuid:12345678-1234-5678-1234-567812345678",
        "12345678-1234-5678-1234-56781234567",
        "12345678-1234-5678-1234-5678123456789",
    ],
)
def test_is_uuid_refuses_anything_but_a_canonical_uuid_string(value):
    assert not is_uuid(value)


def test_new_local_id_is_a_uuid4():
    assert uuid.UUID(new_local_id()).version == 4


def test_public_job_object_has_exactly_the_contract_keys():
    job = Job(local_id=new_local_id(), rev=3, base={"text": ""}, create_sent=True)
    assert list(job.public()) == list(PUBLIC_KEYS)
    assert set(PUBLIC_KEYS) == {
        "local_id", "server_id", "text", "audio_file", "metadata", "server_status",
        "sync_status", "retry_count", "last_sync_attempt_at", "last_error", "created_at",
        "updated_at",
    }


def test_job_record_round_trips_and_ignores_unknown_keys():
    job = Job(local_id=new_local_id(), text="t", metadata={"a": 1}, rev=2)
    rec = job.record()
    rec["from_the_future"] = 1
    assert Job.from_record(rec) == job


def test_job_copy_does_not_share_metadata():
    job = Job(local_id=new_local_id(), metadata={"a": {"b": 1}})
    other = job.copy()
    other.metadata["a"]["b"] = 2
    assert job.metadata == {"a": {"b": 1}}
