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


def _json_values():
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False)
        | st.text(max_size=8)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=8,
    )


def _jobs():
    """Jobs as a store may hold them, odd types included (a hand-edited line folds as it is)."""
    from hypothesis import strategies as st

    text_or_none = st.none() | st.text(max_size=12)
    odd = _json_values()
    metadata = st.dictionaries(st.text(max_size=4), _json_values(), max_size=3)
    fields = {
        "server_id": text_or_none | odd,
        "text": st.text(max_size=12) | odd,
        "audio_file": text_or_none,
        "metadata": metadata,
        "server_status": text_or_none,
        "sync_status": st.sampled_from(["pending", "synced", "error"]),
        "retry_count": st.integers(0, 9) | odd,
        "last_sync_attempt_at": text_or_none,
        "last_error": text_or_none | odd,
        "created_at": st.text(max_size=5),
        "updated_at": st.text(max_size=5),
        "rev": st.integers(0, 2**40) | st.booleans(),
        "base": st.none()
        | st.builds(lambda t, m: {"text": t, "metadata": m}, st.text(max_size=5), metadata)
        | st.fixed_dictionaries({"text": st.text(max_size=5)}),
        "create_sent": st.booleans() | st.integers(0, 2),
        "audio_sent": text_or_none,
        "error_kind": st.none() | st.sampled_from(["gone", "delete"]),
        "next_attempt_at": text_or_none,
        "upload_url": text_or_none,
        "upload_for": text_or_none,
        "upload_offset": st.integers(0, 99),
    }
    return st.builds(
        lambda lid, same, **kw: _with_own_base(Job(lid, **kw), same),
        st.just(str(uuid.uuid4())),
        st.booleans(),
        **fields,
    )


def _with_own_base(job: Job, same: bool) -> Job:
    if same:  # as a folded synced job holds it: a tuple of its own text and metadata
        job._base = (job.text, job.metadata)
    return job


def test_a_jobs_line_is_exactly_the_json_of_its_record() -> None:
    from hypothesis import given, settings

    from jobsyncd.model import compact_json

    @settings(max_examples=400, deadline=None)
    @given(_jobs())
    def check(job: Job) -> None:
        assert job.record_json() == compact_json(job.record())

    check()


def test_a_job_kept_as_stored_equals_the_job_its_record_folds_to() -> None:
    import json as _json

    from hypothesis import given, settings

    from jobsyncd.model import compact_json

    @settings(max_examples=300, deadline=None)
    @given(_jobs())
    def check(job: Job) -> None:
        folded = Job.from_record(_json.loads(compact_json(job.record())))
        kept = job.clone().as_stored()
        for name in Job.__slots__:
            if name != "_base":
                assert getattr(kept, name) == getattr(folded, name), name
        assert kept.base == folded.base
        assert kept.record() == folded.record()

    check()


def test_copy_json_makes_an_equal_value_sharing_no_container() -> None:
    from hypothesis import given, settings

    from jobsyncd.model import copy_json

    def containers(value):
        if isinstance(value, dict):
            yield value
            for item in value.values():
                yield from containers(item)
        elif isinstance(value, list):
            yield value
            for item in value:
                yield from containers(item)

    @settings(max_examples=200, deadline=None)
    @given(_json_values())
    def check(value) -> None:
        copied = copy_json(value)
        assert copied == value
        ours = {id(c) for c in containers(value)}
        assert not ours & {id(c) for c in containers(copied)}

    check()
    deep: list = []
    for _ in range(900):  # `--meta` may nest this deep
        deep = [deep]
    assert copy_json(deep) == deep
