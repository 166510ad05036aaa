"""The job lifecycle as one table: from each status (and error kind), each event, the job that
results, or the refusal. Every field the table does not name must come out unchanged, and the
job given is never changed (the transitions are pure).

(Named test_job_lifecycle.py: tests/server/test_lifecycle.py is the server's own.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from jobsyncd import lifecycle
from jobsyncd.errors import JobsyncdError
from jobsyncd.lifecycle import ErrorKind, Refused
from jobsyncd.model import FIELD_NAMES, STATUSES, Job

T0, T1, NOW = "2026-01-01T00:00:00.000Z", "2026-01-02T00:00:00.000Z", "2026-02-02T00:00:00.000Z"
LID = "0b7e5f1c-2d34-4a56-8b78-9c0d1e2f3a4b"

ON_SERVER = {
    "server_id": "s1",
    "base": {"text": "t", "metadata": {"k": 1}},
    "create_sent": True,
    "audio_sent": "/data/audio/a.wav",
    "audio_file": "/data/audio/a.wav",
    "server_status": "queued",
    "last_sync_attempt_at": T1,
}
ERRORED = {**ON_SERVER, "sync_status": "error", "retry_count": 2, "next_attempt_at": T1}
FAILED = {**ON_SERVER, "sync_status": "failed", "retry_count": 5, "last_error": "boom"}

STATES: dict[str, dict[str, Any]] = {
    "pending": {"sync_status": "pending"},
    "synced": {**ON_SERVER, "sync_status": "synced"},
    "pending_deletion": {**ON_SERVER, "sync_status": "pending_deletion", "error_kind": "delete"},
    "error": {**ERRORED, "last_error": "boom"},
    "error_unconfirmed": {**ERRORED, "last_error": "boom", "error_kind": "unconfirmed"},
    "failed": FAILED,
    "failed_gone": {**FAILED, "error_kind": "gone"},
    "failed_delete": {**FAILED, "error_kind": "delete"},
}


def make(state: str) -> Job:
    return Job(
        LID, text="t", metadata={"k": 1}, created_at=T0, updated_at=T0, rev=3, **STATES[state]
    )


def next_attempt(retries: int) -> str:
    return f"next-{retries}"


EVENTS: dict[str, Callable[[Job], Job]] = {
    "edited": lambda j: lifecycle.edited(j, NOW, text="new", metadata={"k": 2}, audio_file=None),
    "marked_for_deletion": lambda j: lifecycle.marked_for_deletion(j, NOW),
    "retried": lifecycle.retried,
    "synced": lifecycle.synced,
    "outdated_on_server": lifecycle.outdated_on_server,
    "errored": lambda j: lifecycle.errored(
        j, NOW, "oops", lifecycle.failure_kind(j, False), 5, next_attempt
    ),
    "errored_last_retry": lambda j: lifecycle.errored(
        j, NOW, "oops", lifecycle.failure_kind(j, False), 1, next_attempt
    ),
    "failed": lambda j: lifecycle.failed(j, NOW, "refused", lifecycle.failure_kind(j, False)),
    "failed_gone": lambda j: lifecycle.failed(j, NOW, "404", lifecycle.failure_kind(j, True)),
    "reuploaded": lifecycle.reuploaded,
    "recovered": lifecycle.recovered,
}

REFUSED = "refused"  # raises Refused, nothing changed
SAME = "same"  # the very job given back: nothing to write

EDIT = {"text": "new", "metadata": {"k": 2}, "audio_file": None, "rev": 4, "updated_at": NOW}
FORGOTTEN = {"server_id": None, "base": None, "create_sent": False, "audio_sent": None}
TO_PENDING = {"sync_status": "pending", "retry_count": 0, "next_attempt_at": None}
DELETING = {
    "sync_status": "pending_deletion",
    "error_kind": "delete",
    "retry_count": 0,
    "next_attempt_at": None,
    "rev": 4,
    "updated_at": NOW,
}
SYNCED = {
    "sync_status": "synced",
    "retry_count": 0,
    "next_attempt_at": None,
    "last_error": None,
    "error_kind": None,
}
ATTEMPT = {"last_sync_attempt_at": NOW, "last_error": "oops"}
REFUSAL = {"last_sync_attempt_at": NOW, "last_error": "refused", "sync_status": "failed"}
GONE = {"last_sync_attempt_at": NOW, "last_error": "404", "sync_status": "failed"}

# (state, event) -> the fields that change, with their new values; REFUSED; or SAME.
TABLE: dict[tuple[str, str], Any] = {
    # edited: pending again with a fresh retry budget; a deletion refuses
    ("pending", "edited"): EDIT,
    ("synced", "edited"): {**EDIT, **TO_PENDING},
    ("pending_deletion", "edited"): REFUSED,
    ("error", "edited"): {**EDIT, **TO_PENDING},
    ("error_unconfirmed", "edited"): {**EDIT, **TO_PENDING, "error_kind": None},
    ("failed", "edited"): {**EDIT, **TO_PENDING},
    ("failed_gone", "edited"): {**EDIT, **TO_PENDING, **FORGOTTEN, "error_kind": None},
    ("failed_delete", "edited"): REFUSED,
    # marked_for_deletion: from anywhere; twice is once
    ("pending", "marked_for_deletion"): DELETING,
    ("synced", "marked_for_deletion"): DELETING,
    ("pending_deletion", "marked_for_deletion"): SAME,
    ("error", "marked_for_deletion"): DELETING,
    ("error_unconfirmed", "marked_for_deletion"): DELETING,
    ("failed", "marked_for_deletion"): DELETING,
    ("failed_gone", "marked_for_deletion"): DELETING,
    ("failed_delete", "marked_for_deletion"): DELETING,
    # retried: only failed jobs, back where they were going
    ("pending", "retried"): REFUSED,
    ("synced", "retried"): REFUSED,
    ("pending_deletion", "retried"): REFUSED,
    ("error", "retried"): REFUSED,
    ("error_unconfirmed", "retried"): REFUSED,
    ("failed", "retried"): {**TO_PENDING, "rev": 4},
    ("failed_gone", "retried"): {**TO_PENDING, **FORGOTTEN, "rev": 4, "error_kind": None},
    ("failed_delete", "retried"): {
        "sync_status": "pending_deletion",
        "retry_count": 0,
        "rev": 4,
    },
    # synced: a create or update the server took as sent
    ("pending", "synced"): SYNCED,
    ("synced", "synced"): REFUSED,
    ("pending_deletion", "synced"): REFUSED,
    ("error", "synced"): SYNCED,
    ("error_unconfirmed", "synced"): SYNCED,
    ("failed", "synced"): REFUSED,
    ("failed_gone", "synced"): REFUSED,
    ("failed_delete", "synced"): REFUSED,
    # outdated_on_server: the server answered an older version; pending, last_error kept
    ("pending", "outdated_on_server"): {"error_kind": None},
    ("synced", "outdated_on_server"): REFUSED,
    ("pending_deletion", "outdated_on_server"): REFUSED,
    ("error", "outdated_on_server"): TO_PENDING,
    ("error_unconfirmed", "outdated_on_server"): {**TO_PENDING, "error_kind": None},
    ("failed", "outdated_on_server"): REFUSED,
    ("failed_gone", "outdated_on_server"): REFUSED,
    ("failed_delete", "outdated_on_server"): REFUSED,
    # errored: one more retry, due again later; a deletion stays one
    ("pending", "errored"): {
        **ATTEMPT,
        "sync_status": "error",
        "retry_count": 1,
        "next_attempt_at": "next-1",
    },
    ("synced", "errored"): REFUSED,
    ("pending_deletion", "errored"): {**ATTEMPT, "retry_count": 1, "next_attempt_at": "next-1"},
    ("error", "errored"): {**ATTEMPT, "retry_count": 3, "next_attempt_at": "next-3"},
    ("error_unconfirmed", "errored"): {**ATTEMPT, "retry_count": 3, "next_attempt_at": "next-3"},
    ("failed", "errored"): REFUSED,
    ("failed_gone", "errored"): REFUSED,
    ("failed_delete", "errored"): REFUSED,
    # errored on the last retry: failed
    ("pending", "errored_last_retry"): {**ATTEMPT, "sync_status": "failed", "retry_count": 1},
    ("synced", "errored_last_retry"): REFUSED,
    ("pending_deletion", "errored_last_retry"): {
        **ATTEMPT,
        "sync_status": "failed",
        "retry_count": 1,
    },
    ("error", "errored_last_retry"): {
        **ATTEMPT,
        "sync_status": "failed",
        "retry_count": 3,
        "next_attempt_at": None,
    },
    ("error_unconfirmed", "errored_last_retry"): {
        **ATTEMPT,
        "sync_status": "failed",
        "retry_count": 3,
        "next_attempt_at": None,
    },
    ("failed", "errored_last_retry"): REFUSED,
    ("failed_gone", "errored_last_retry"): REFUSED,
    ("failed_delete", "errored_last_retry"): REFUSED,
    # failed: a permanent refusal, retry_count not counted up
    ("pending", "failed"): REFUSAL,
    ("synced", "failed"): REFUSED,
    ("pending_deletion", "failed"): REFUSAL,
    ("error", "failed"): {**REFUSAL, "next_attempt_at": None},
    ("error_unconfirmed", "failed"): {**REFUSAL, "next_attempt_at": None},
    ("failed", "failed"): REFUSED,
    ("failed_gone", "failed"): REFUSED,
    ("failed_delete", "failed"): REFUSED,
    # failed as gone (404 on PATCH): `retry` creates it again; a deletion stays a deletion
    ("pending", "failed_gone"): {**GONE, "error_kind": "gone"},
    ("synced", "failed_gone"): REFUSED,
    ("pending_deletion", "failed_gone"): GONE,
    ("error", "failed_gone"): {**GONE, "error_kind": "gone", "next_attempt_at": None},
    ("error_unconfirmed", "failed_gone"): {**GONE, "error_kind": "gone", "next_attempt_at": None},
    ("failed", "failed_gone"): REFUSED,
    ("failed_gone", "failed_gone"): REFUSED,
    ("failed_delete", "failed_gone"): REFUSED,
    # reuploaded: a synced job the server lost, to be created again
    **{(s, "reuploaded"): REFUSED for s in STATES if s != "synced"},
    ("synced", "reuploaded"): {
        **TO_PENDING,
        **FORGOTTEN,
        "server_status": None,
        "last_error": None,
        "error_kind": None,
    },
    # recovered: failed as gone, and the server has it again
    **{(s, "recovered"): REFUSED for s in STATES if s != "failed_gone"},
    ("failed_gone", "recovered"): {**TO_PENDING, "last_error": None, "error_kind": None},
}


def fields(job: Job) -> dict[str, Any]:
    return {name: getattr(job, name) for name in FIELD_NAMES}


def test_the_table_covers_every_status_and_event():
    assert set(TABLE) == {(s, e) for s in STATES for e in EVENTS}
    assert {STATES[s]["sync_status"] for s in STATES} == set(STATUSES)


@pytest.mark.parametrize(("state", "event"), sorted(TABLE), ids=lambda v: v)
def test_each_transition_changes_exactly_the_fields_the_table_names(state, event):
    job = make(state)
    before = fields(job)
    expected = TABLE[state, event]
    if expected == REFUSED:
        with pytest.raises(Refused) as refused:
            EVENTS[event](job)
        assert refused.value.exit_code == JobsyncdError.exit_code
        assert LID in str(refused.value)
    else:
        new = EVENTS[event](job)
        if expected == SAME:
            assert new is job
        else:
            assert new is not job
            assert fields(new) == {**before, **expected}
    assert fields(job) == before, "a transition changed the job it was given"


def test_error_kinds_keep_the_values_stores_already_hold():
    assert {k.name: k.value for k in ErrorKind} == {
        "DELETE": "delete",
        "GONE": "gone",
        "UNCONFIRMED": "unconfirmed",
    }
    job = lifecycle.failed(make("pending"), NOW, "x", ErrorKind.GONE)
    assert type(job.error_kind) is str
    assert job.record()["error_kind"] == "gone"


def test_status_constants_are_the_statuses_of_the_model():
    assert (
        lifecycle.PENDING,
        lifecycle.SYNCED,
        lifecycle.PENDING_DELETION,
        lifecycle.ERROR,
        lifecycle.FAILED,
    ) == ("pending", "synced", "pending_deletion", "error", "failed")


def test_each_pass_stop_has_one_exit_code_and_reads_as_its_contract_name():
    """Contract 2: `skipped` is offline, tls, auth or backoff; offline and backoff exit 75,
    auth 77, tls 1; a pass that is not ok without a stop (jobs errored) exits 1."""
    import json

    from jobsyncd.api import Stop

    codes = {stop.value: stop.exit_code for stop in Stop}
    assert codes == {"offline": 75, "tls": 1, "auth": 77, "backoff": 75}
    assert Stop.exit_code_of(None) == 1
    assert Stop.exit_code_of("something new") == 1
    assert json.dumps({"skipped": Stop.AUTH}) == '{"skipped": "auth"}'
    assert f"{Stop.BACKOFF}" == str(Stop.BACKOFF) == "backoff"
