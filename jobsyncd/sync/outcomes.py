"""What a pass learned about one job, and the one pure function that applies it.

The pass decides and talks (push.py, pull.py) without the store lock; what it learned is an
outcome, an immutable record (a NamedTuple: a seventh of a frozen dataclass's import time, and
quicker to make, one per job), written later by the journal (journal.py) under the lock, applied
to the job's *current* record: an edit made while its push was in flight stays pending
(compared by `rev`), and a local change is never dropped for a server's.

`apply(view, outcome, policy, now, rng)` returns an `Applied`: the job's new version or its
removal, and what the summary counts and the `-v` log say about it. It changes nothing itself:
no store, no summary, no log, no file (a rebind's audio hash is taken when it is decided).
Status changes go through lifecycle.py.
"""

from __future__ import annotations

import datetime as _dt
import functools
import random
from typing import NamedTuple, Protocol

from .. import lifecycle
from ..api import ServerJob
from ..lifecycle import FAILED, SYNCED, ErrorKind
from ..model import Job, backoff_delay, is_uuid, new_local_id, rfc3339
from .rules import Policy, differs


class JobView(Protocol):
    """The jobs as the outcomes applied so far in one write left them."""

    def get(self, local_id: str) -> Job | None: ...

    def has_server_id(self, server_id: str) -> bool: ...


class Pushed(NamedTuple):
    """The server answered a create or an update of `snap` (the job as sent) with `sj`."""

    snap: Job
    sj: ServerJob
    audio_on_server: str | None  # the local audio file the server's copy now holds
    created: bool


class DeletedOnServer(NamedTuple):
    """A local deletion reached the server (or there was nothing there to delete)."""

    local_id: str


class PushFailed(NamedTuple):
    """A push of `snap` failed for this job alone (the pass goes on)."""

    snap: Job
    message: str
    permanent: bool  # failed at once, else an error with back-off
    gone: bool  # a PATCH the server answered 404: the server lost the job
    bind_id: str | None = None  # a valid server id an invalid create answer named


class ServerCopyTaken(NamedTuple):
    """A synced job's server copy differs: the server wins (if the job is still at `rev`)."""

    local_id: str
    rev: int
    sj: ServerJob


class AddedFromServer(NamedTuple):
    """A job this agent does not know: added, under its local_id when that is free."""

    sj: ServerJob


class Rebound(NamedTuple):
    """The server deleted and re-created a job under its local_id (a restore): the local job
    follows it to its new server id. `audio_sha256` is the sha256 of the job's `audio_path`
    when this was decided (None: no audio, or unreadable)."""

    local_id: str
    old_server_id: str
    sj: ServerJob
    audio_path: str | None = None
    audio_sha256: str | None = None


class BackToPending(NamedTuple):
    """--reupload: a synced job the server lacks goes back to pending, to be created again."""

    local_id: str
    server_id: str


class RemovedByServer(NamedTuple):
    """The server deleted a job that was synced here: it goes here too, with its audio."""

    local_id: str
    server_id: str


Outcome = (
    Pushed
    | DeletedOnServer
    | PushFailed
    | ServerCopyTaken
    | AddedFromServer
    | Rebound
    | BackToPending
    | RemovedByServer
)


class Applied(NamedTuple):
    """What applying an outcome comes to. `job`: its new version to write; `purged`: the
    local_id removed (its managed audio `audio_to_remove`, removed after the write); `counts`:
    (PassSummary field, amount) to add; `again`: the job needs another pass; `line`: the -v
    per-job log line (verb, local_id, detail)."""

    job: Job | None = None
    purged: str | None = None
    audio_to_remove: str | None = None
    counts: tuple[tuple[str, int], ...] = ()
    again: bool = False
    line: tuple[str, str, str] | None = None


NOTHING = Applied()


def apply(
    view: JobView, outcome: Outcome, policy: Policy, now: _dt.datetime, rng: random.Random
) -> Applied:
    """The outcome applied to the job as `view` holds it now (see the module's docstring)."""
    if isinstance(outcome, Pushed):
        return _pushed(view, outcome, now)
    if isinstance(outcome, PushFailed):
        return _push_failed(view, outcome, policy, now, rng)
    if isinstance(outcome, DeletedOnServer):
        cur = view.get(outcome.local_id)
        if cur is None:
            return NOTHING
        return Applied(purged=cur.local_id, audio_to_remove=cur.audio_file or "")
    if isinstance(outcome, ServerCopyTaken):
        return _server_copy_taken(view, outcome, now)
    if isinstance(outcome, AddedFromServer):
        return _added_from_server(view, outcome.sj, now)
    if isinstance(outcome, Rebound):
        return _rebound(view, outcome, now)
    if isinstance(outcome, BackToPending):
        cur = view.get(outcome.local_id)
        if cur is None or cur.sync_status != SYNCED or cur.server_id != outcome.server_id:
            return NOTHING  # changed locally meanwhile: it goes its own way
        return Applied(
            job=lifecycle.reuploaded(cur),
            counts=(("reuploaded", 1),),
            line=("reuploaded", outcome.local_id, ""),
        )
    if not isinstance(outcome, RemovedByServer):
        # Never a deletion by default: an outcome nobody taught apply() is a bug, loudly.
        raise TypeError(f"not an outcome: {outcome!r}")
    cur = view.get(outcome.local_id)
    if cur is None or cur.sync_status != SYNCED or cur.server_id != outcome.server_id:
        return NOTHING  # changed locally meanwhile: a local change is never dropped
    return Applied(
        purged=outcome.local_id,
        audio_to_remove=cur.audio_file or "",
        counts=(("deleted_locally", 1),),
        line=("removed", outcome.local_id, ""),
    )


def _pushed(view: JobView, outcome: Pushed, now: _dt.datetime) -> Applied:
    snap, sj, audio_on_server = outcome.snap, outcome.sj, outcome.audio_on_server
    cur = view.get(snap.local_id)
    if cur is None:
        return NOTHING
    again = False
    if cur.rev != snap.rev or cur.sync_status != snap.sync_status:
        new, again = cur.clone(), True  # changed while in flight: pushed by the next pass
    else:
        # A PATCH carried what changed here; whatever else the server holds (another client's
        # edit of a field we did not send) wins, as for any synced job.
        text, metadata = (cur.text, cur.metadata) if outcome.created else (sj.text, sj.metadata)
        if sj.text == text and sj.metadata == metadata and audio_on_server == snap.audio_file:
            new = lifecycle.synced(cur)
        else:
            # The server holds another version (an earlier POST whose answer was lost): ours
            # is newer, so it stays pending and the next pass PATCHes the difference.
            new, again = lifecycle.outdated_on_server(cur), True
        new.text, new.metadata = text, metadata
    new.server_id = sj.id
    new.create_sent = True
    new.server_status = sj.status
    new.base = {"text": sj.text, "metadata": sj.metadata}
    new.audio_sent = audio_on_server
    if new.upload_url is not None and new.upload_for == audio_on_server:
        new.upload_url, new.upload_for, new.upload_offset = None, None, 0  # attached: done
    new.last_sync_attempt_at = _stamp(now)
    return Applied(job=new, again=again)


@functools.lru_cache(maxsize=4)
def _stamp(now: _dt.datetime) -> str:
    """RFC 3339 of the write's time: one per write, not one per job of a batch of 500."""
    return rfc3339(now)


def _push_failed(
    view: JobView, outcome: PushFailed, policy: Policy, now: _dt.datetime, rng: random.Random
) -> Applied:
    snap = outcome.snap
    cur = view.get(snap.local_id)
    if cur is None or cur.rev != snap.rev:
        return NOTHING  # edited meanwhile: the new version gets a fresh attempt
    cur = cur.copy()
    kind = lifecycle.failure_kind(cur, outcome.gone)
    if outcome.bind_id is not None and cur.server_id is None:
        # Recorded so that a delete reaches that copy; but the create is sent again
        # (idempotent by local_id) until the server answers it with a valid job.
        cur.server_id = outcome.bind_id
        cur.create_sent = True
        kind = ErrorKind.UNCONFIRMED
    stamp = _stamp(now)
    if outcome.permanent:
        return Applied(job=lifecycle.failed(cur, stamp, outcome.message, kind))

    def next_attempt_at(retries: int) -> str:
        delay = backoff_delay(policy.backoff_base_seconds, retries, rng)
        return rfc3339(now + _dt.timedelta(seconds=delay))

    cur = lifecycle.errored(
        cur, stamp, outcome.message, kind, policy.max_retries, next_attempt_at
    )
    if cur.sync_status == FAILED:  # counted as an error when it failed: out of retries now
        return Applied(job=cur, counts=(("errors", -1), ("failed", 1)))
    return Applied(job=cur)


def _server_copy_taken(view: JobView, outcome: ServerCopyTaken, now: _dt.datetime) -> Applied:
    sj = outcome.sj
    cur = view.get(outcome.local_id)
    if cur is None or cur.sync_status != SYNCED or cur.rev != outcome.rev or not differs(cur, sj):
        return NOTHING
    cur = cur.copy()
    cur.text, cur.metadata, cur.server_status = sj.text, sj.metadata, sj.status
    cur.base = {"text": sj.text, "metadata": sj.metadata}
    cur.updated_at = sj.updated_at or _stamp(now)
    return Applied(job=cur, counts=(("pulled", 1),), line=("pulled", outcome.local_id, ""))


def _added_from_server(view: JobView, sj: ServerJob, now: _dt.datetime) -> Applied:
    if view.has_server_id(sj.id):
        return NOTHING
    wanted = sj.local_id.lower() if sj.local_id else None
    local_id = wanted if wanted and is_uuid(wanted) and view.get(wanted) is None else new_local_id()
    stamp = _stamp(now)
    job = Job(
        local_id=local_id,
        server_id=sj.id,
        text=sj.text,
        metadata=sj.metadata,
        server_status=sj.status,
        sync_status=SYNCED,
        created_at=sj.created_at or stamp,
        updated_at=sj.updated_at or stamp,
        last_sync_attempt_at=stamp,
        base={"text": sj.text, "metadata": sj.metadata},
        create_sent=True,
    )
    return Applied(job=job, counts=(("pulled", 1),), line=("pulled", local_id, ""))


def _rebound(view: JobView, outcome: Rebound, now: _dt.datetime) -> Applied:
    sj = outcome.sj
    cur = view.get(outcome.local_id)
    if cur is None or cur.server_id != outcome.old_server_id:
        return NOTHING
    cur = cur.copy()
    cur.server_id = sj.id
    cur.create_sent = True
    cur.base = {"text": sj.text, "metadata": sj.metadata}  # a PATCH sends what differs
    same_audio = (
        bool(cur.audio_file)
        and cur.audio_file == outcome.audio_path
        and sj.audio is not None
        and bool(sj.audio)
        and sj.audio.get("sha256") == outcome.audio_sha256
    )
    cur.audio_sent = cur.audio_file if same_audio else None
    if cur.sync_status == SYNCED:
        cur.text, cur.metadata, cur.server_status = sj.text, sj.metadata, sj.status
        cur.updated_at = sj.updated_at or _stamp(now)
        cur.audio_sent = cur.audio_file  # server wins; audio is never downloaded
    elif cur.sync_status == FAILED and cur.error_kind == ErrorKind.GONE:
        # It failed because the server lost it; the server has it again: push the edit.
        cur = lifecycle.recovered(cur)
    cur.server_status = sj.status
    detail = f"rebound to server id {sj.id[:64]}"
    return Applied(job=cur, counts=(("pulled", 1),), line=("pulled", outcome.local_id, detail))
