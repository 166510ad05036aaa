"""The job lifecycle: every sync status transition, as a pure function returning a new Job.

The CLI's job operations (`jobs.py`) and the sync pass call these; neither sets a job's
`sync_status`, `retry_count`, `next_attempt_at`, `last_error` or `error_kind` itself. Also the
one home of the status constants and of `ErrorKind`, the values `error_kind` holds on disk.
No I/O: a transition gets the time it needs as an RFC 3339 stamp from its caller.

    pending ──push ok──────────────────> synced ──edited──> pending
    pending/error ──transient error────> error (backoff) ──max_retries──> failed
    pending/error ──permanent error────> failed ──retried──> pending (or pending_deletion)
    any but pending_deletion ──marked_for_deletion──> pending_deletion ──error──> (itself, backoff)
    synced ──reuploaded (server lost it, --reupload)──> pending, no server copy
    failed (gone) ──recovered (the server has it again)──> pending
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from .errors import JobsyncdError
from .model import Job, SyncStatus

PENDING = SyncStatus.PENDING.value
SYNCED = SyncStatus.SYNCED.value
PENDING_DELETION = SyncStatus.PENDING_DELETION.value
ERROR = SyncStatus.ERROR.value
FAILED = SyncStatus.FAILED.value


class ErrorKind(str, Enum):
    """Why a job is in `error` or `failed`, as far as what happens next depends on it. The
    values are what the store holds in `error_kind` (a contract with stores already written)."""

    # The job was a deletion: `retry` puts it back to pending_deletion, never to pending.
    DELETE = "delete"
    # The server lost it (404 on PATCH): `retry` or an edit creates it again.
    GONE = "gone"
    # Bound to the id an invalid create answer named: created again (idempotent by local_id)
    # until the server answers with a valid job.
    UNCONFIRMED = "unconfirmed"


class Refused(JobsyncdError):
    """A transition the job's status does not allow; nothing changed (exit 1)."""


def _evolve(job: Job, **changes: Any) -> Job:
    """A new Job: `job`'s fields with `changes`. Text, metadata and base are shared, not copied:
    no transition changes them in place, and a deep copy per job would slow every pass."""
    new = job.clone()  # generated code: a quarter of the time of a setattr per slot
    for name, value in changes.items():
        setattr(new, name, value)
    return new


_FORGET_SERVER_COPY = {"server_id": None, "base": None, "create_sent": False, "audio_sent": None}
_CLEAR_RETRIES = {"retry_count": 0, "next_attempt_at": None}


def is_deleting(job: Job) -> bool:
    """Whether the job is on its way out: marked for deletion, or a deletion that errored."""
    return job.sync_status == PENDING_DELETION or (
        job.sync_status in (FAILED, ERROR) and job.error_kind == ErrorKind.DELETE
    )


def check_editable(job: Job) -> None:
    """Raise Refused for a job being deleted: an edit would bring it back to life unasked."""
    if is_deleting(job):
        raise Refused(
            f"job {job.local_id} is being deleted ({job.sync_status}); it cannot be "
            "updated (`jobsyncd retry` a failed delete first)"
        )


# ---- what the user does ----------------------------------------------------------------------


def edited(
    job: Job, now: str, *, text: str, metadata: dict[str, Any], audio_file: str | None
) -> Job:
    """The user changed the job: pending again with a fresh retry budget (a pending job stays
    as it is but for the content). A job the server lost is created again by the next pass."""
    check_editable(job)
    changes: dict[str, Any] = {
        "text": text,
        "metadata": metadata,
        "audio_file": audio_file,
        "rev": job.rev + 1,
        "updated_at": now,
    }
    if job.sync_status in (ERROR, FAILED, SYNCED):
        if job.error_kind == ErrorKind.GONE:
            changes.update(_FORGET_SERVER_COPY)
        changes.update(_CLEAR_RETRIES, sync_status=PENDING, error_kind=None)
    return _evolve(job, **changes)


def marked_for_deletion(job: Job, now: str) -> Job:
    """The user deleted the job: the next pass deletes it on the server, then here. A job
    already marked is returned as it is (the same object: nothing to write)."""
    if job.sync_status == PENDING_DELETION:
        return job
    return _evolve(
        job,
        sync_status=PENDING_DELETION,
        error_kind=ErrorKind.DELETE.value,
        rev=job.rev + 1,
        updated_at=now,
        **_CLEAR_RETRIES,
    )


def retried(job: Job) -> Job:
    """`jobsyncd retry`: a failed job goes back where it was going (a deletion to
    pending_deletion, else pending; one the server lost without its server copy), retry_count 0."""
    if job.sync_status != FAILED:
        raise Refused(
            f"job {job.local_id} is {job.sync_status}, not failed; only failed jobs "
            "can be retried (nothing changed)"
        )
    changes: dict[str, Any] = {"rev": job.rev + 1, **_CLEAR_RETRIES}
    if job.error_kind == ErrorKind.DELETE:
        changes["sync_status"] = PENDING_DELETION
    else:
        changes["sync_status"] = PENDING
        if job.error_kind == ErrorKind.GONE:
            changes.update(_FORGET_SERVER_COPY, error_kind=None)
    return _evolve(job, **changes)


# ---- what a push brings ----------------------------------------------------------------------

_PUSHED = (PENDING, ERROR)  # the statuses a create or an update is pushed from
_ATTEMPTED = (PENDING, ERROR, PENDING_DELETION)  # ... and a deletion


def _check_from(job: Job, allowed: tuple[str, ...], what: str) -> None:
    if job.sync_status not in allowed:
        raise Refused(f"job {job.local_id} is {job.sync_status}; it cannot be {what}")


def synced(job: Job) -> Job:
    """The server holds what the push sent: synced, with the error state cleared."""
    _check_from(job, _PUSHED, "synced by a push")
    return _evolve(job, sync_status=SYNCED, last_error=None, error_kind=None, **_CLEAR_RETRIES)


def outdated_on_server(job: Job) -> Job:
    """A create was answered with another version (an earlier POST whose answer was lost): ours
    is newer, so the job stays pending, due at once, and the next pass PATCHes the difference."""
    _check_from(job, _PUSHED, "left pending by a push")
    return _evolve(job, sync_status=PENDING, error_kind=None, **_CLEAR_RETRIES)


def failure_kind(job: Job, gone: bool) -> ErrorKind | None:
    """The kind a failed push records: a deletion stays a deletion; `gone` (the server lost
    the job it was to update) is the next; an unconfirmed binding stays so until confirmed."""
    if job.sync_status == PENDING_DELETION:
        return ErrorKind.DELETE
    if gone:
        return ErrorKind.GONE
    if job.error_kind == ErrorKind.UNCONFIRMED:
        return ErrorKind.UNCONFIRMED
    return None


def errored(
    job: Job,
    attempted_at: str,
    message: str,
    kind: ErrorKind | None,
    max_retries: int,
    next_attempt_at: Callable[[int], str],
) -> Job:
    """A transient failure: one more retry counted. Due again at `next_attempt_at(retry_count)`
    (a deletion stays pending_deletion meanwhile), or `failed` once max_retries are spent."""
    _check_from(job, _ATTEMPTED, "errored by a push")
    retries = job.retry_count + 1
    changes: dict[str, Any] = {
        "retry_count": retries,
        "last_sync_attempt_at": attempted_at,
        "last_error": message,
        "error_kind": None if kind is None else kind.value,
    }
    if retries >= max_retries:
        changes.update(sync_status=FAILED, next_attempt_at=None)
    else:
        deleting = job.sync_status == PENDING_DELETION
        changes.update(
            sync_status=PENDING_DELETION if deleting else ERROR,
            next_attempt_at=next_attempt_at(retries),
        )
    return _evolve(job, **changes)


def failed(job: Job, attempted_at: str, message: str, kind: ErrorKind | None) -> Job:
    """A permanent refusal: failed until `jobsyncd retry` (retry_count is not counted up)."""
    _check_from(job, _ATTEMPTED, "failed by a push")
    return _evolve(
        job,
        sync_status=FAILED,
        next_attempt_at=None,
        last_sync_attempt_at=attempted_at,
        last_error=message,
        error_kind=None if kind is None else kind.value,
    )


# ---- what a pull brings ----------------------------------------------------------------------


def reuploaded(job: Job) -> Job:
    """A synced job the server lost (`sync --reupload`, or a resync after a restore), to be
    created again: pending, no server copy known."""
    _check_from(job, (SYNCED,), "uploaded again")
    return _evolve(
        job,
        sync_status=PENDING,
        last_error=None,
        error_kind=None,
        server_status=None,
        **_FORGET_SERVER_COPY,
        **_CLEAR_RETRIES,
    )


def recovered(job: Job) -> Job:
    """A job that failed because the server lost it, found on the server again (a restore):
    pending, so that the next pass pushes its edit to the copy it now is bound to."""
    if job.sync_status != FAILED or job.error_kind != ErrorKind.GONE:
        raise Refused(f"job {job.local_id} did not fail as gone; it cannot be recovered")
    return _evolve(job, sync_status=PENDING, last_error=None, error_kind=None, **_CLEAR_RETRIES)
