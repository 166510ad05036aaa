"""The push (contract 6.3): each due job's local change sent to the server, as one request of
its own (with its audio as multipart, or a resumable upload, 6.8) or in a batch (6.3 "Batches").

Decides and talks; what it learns goes to the journal as outcomes (journal.py), never straight
into the store. Counts what it sent (created, updated, deleted_remote, errors, failed).
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .. import log
from ..api import (
    AuthRefused,
    BackOff,
    BatchNotOffered,
    BatchTooLarge,
    Gone,
    Offline,
    Permanent,
    RemoteError,
    ServerJob,
    Stop,
    TLSFailure,
    Transient,
)
from ..lifecycle import PENDING_DELETION, ErrorKind
from ..model import Job, compact_json
from .journal import FLUSH_EVERY_JOBS, PassContext
from .outcomes import DeletedOnServer, Pushed, PushFailed
from .rules import (
    changed_fields,
    file_sha256,
    is_due,
    longest_backoff,
    raise_if_stops,
    stop_for,
    worth_asking,
)

BATCH_MAX_OPS = 500
BATCH_MAX_BYTES = (8 << 20) - 64 * 1024  # the server's 8 MiB, less room for the envelope
# Jobs whose creates are marked (create_sent, fsynced) in one write before their batches go:
# one fsync per four batches, not per batch (at 5 ms each, a second of 100,000 jobs).
MARK_AHEAD = 4 * BATCH_MAX_OPS
# The interpreter's switch interval while batches go: the thread that waits for a batch's answer
# gets the GIL within 1 ms of the answer's arrival, not 5 ms (the default) of the pass's work
# after it, at each of the several times a request blocks (a tenth of a first sync).
BATCH_SWITCH_INTERVAL = 0.001
# error_kind of a job bound to the id an invalid create answer named: created again until valid
UNCONFIRMED = ErrorKind.UNCONFIRMED.value

_Batch = list[tuple[Job, tuple[str, bytes]]]  # jobs and their operations as JSON


class Pusher:
    def __init__(
        self,
        ctx: PassContext,
        progress: Callable[[int], Any] | None = None,
        upload_progress: Callable[[int, int], Any] | None = None,
    ) -> None:
        self.store, self.remote, self.policy = ctx.store, ctx.remote, ctx.policy
        self.journal, self.summary = ctx.journal, ctx.summary
        self.should_stop, self.pull_state = ctx.should_stop, ctx.pull_state
        self.progress = progress
        self.upload_progress = upload_progress
        self.via: Any = ctx.remote  # what a push talks to: the server, or a batch's answers
        self._uploader: Any = None  # upload.Uploader once the server offers uploads
        self._uploads_checked = False
        self.done = 0

    def push(self, now: _dt.datetime, candidates: list[str] | None = None) -> None:
        """Push the due jobs; `candidates` (sparse mode): the only local_ids that may be due,
        looked up one by one instead of folding the store."""
        if candidates is not None:
            found = (self.store.lookup(lid) for lid in candidates)
            maybe: Iterable[Job] = [j for j in found if j is not None]
        else:
            maybe = self.store.refresh().may_be_due()  # the lines of synced jobs stay unparsed
        max_wait = longest_backoff(self.policy)
        due = [j for j in maybe if is_due(j, now, max_wait)]
        due.sort(key=lambda j: (j.created_at, j.local_id))
        if not due:
            return
        singles = due
        self.done = 0
        try:
            if self._batch_wanted():
                fits = [_batchable(j) for j in due]
                batchable = [j.local_id for j, fit in zip(due, fits, strict=True) if fit]
                if batchable:
                    singles = [j for j, fit in zip(due, fits, strict=True) if not fit]
                    # Each batch reads its jobs when it sends them: no list here keeps every
                    # job's old version alive while the store moves on (100,000 jobs: 80 MiB).
                    due = maybe = []
                    singles = self._push_batched(batchable, now, max_wait) + singles
            self._push_singles(singles)
        finally:
            self.journal.flush()
            self.journal.unmark_unsent()
            self.journal.forget_bound()

    def _push_singles(self, singles: list[Job]) -> None:
        for first in range(0, len(singles), FLUSH_EVERY_JOBS):
            chunk = [j.copy() for j in singles[first : first + FLUSH_EVERY_JOBS]]
            self.journal.mark_create_sent(chunk)
            for snap in chunk:
                if self.should_stop():
                    return
                self.push_one(snap)
                self._progressed(1)

    def _progressed(self, jobs: int) -> None:
        self.done += jobs
        if self.progress is not None:
            self.progress(self.done)

    # ---- resumable uploads (6.8) -----------------------------------------------------------------
    def _wants_upload(self, path: str) -> bool:
        chunk = self.policy.upload_chunk_bytes
        if chunk <= 0:
            return False
        try:
            if os.path.getsize(path) <= chunk:
                return False
        except OSError:
            return False  # the multipart path reports the unreadable file
        return self._uploads_offered()

    def _uploads_offered(self) -> bool:
        if self._uploads_checked:
            return self._uploader is not None
        self._uploads_checked = True
        now = time.time()
        if not worth_asking(self.pull_state, "uploads", now):
            return False  # asked again after a day
        # A remote that cannot carry uploads (in memory) has none; the audio goes with the job.
        uploader = self.remote.uploader(self.policy.upload_chunk_bytes, self.upload_progress)
        offered = uploader is not None and uploader.probe()
        self.pull_state["uploads"] = {"offered": offered, "checked_at": now}
        if offered:
            self._uploader = uploader
        return offered

    def _upload(self, snap: Job, path: str) -> tuple[tuple[str, str], str | None]:
        """Send `path` as a resumable upload, from where the server says it stands; returns
        ((upload id, filename), the file's sha256). The URL and each confirmed offset are
        recorded in the job's record as they go (crash-safe), so no confirmed byte is ever
        sent twice. Raises _UploadStopped when stopped between chunks."""
        from ..upload import UploadGone

        uploader = self._uploader
        assert uploader is not None
        name = os.path.basename(path)
        url = snap.upload_url if snap.upload_for == path else None
        if snap.upload_url and url is None:
            self._abandon(snap.upload_url)  # an upload of audio the job no longer has
            self._record_upload(snap.local_id, None, None, 0)
        for _ in range(2):
            new = url is None
            if url is None:
                url = uploader.start(path, name)
                self._record_upload(snap.local_id, url, path, 0)

            def confirmed(at: str, offset: int, url: str = url) -> None:
                self._record_upload(snap.local_id, url, path, offset)

            try:
                outcome = uploader.resume(
                    url,
                    path,
                    offset_callback=confirmed,
                    should_stop=lambda: self.should_stop() or self._audio_moved(snap, path),
                    new=new,
                )
            except UploadGone:
                self._record_upload(snap.local_id, None, None, 0)
                url = None  # expired or terminated: start again from zero
                continue
            if not outcome.complete:
                raise _UploadStopped()
            return (url.rstrip("/").rsplit("/", 1)[1], name), outcome.sha256
        raise Transient("the server lost the job's upload twice in one pass")

    def _audio_moved(self, snap: Job, path: str) -> bool:
        """An `update --audio` (or a delete) landed while this audio was going up."""
        cur = self.store.lookup(snap.local_id)
        return cur is None or cur.audio_file != path or cur.sync_status == PENDING_DELETION

    def _record_upload(self, local_id: str, url: str | None, path: str | None, offset: int) -> None:
        with self.store.locked():
            cur = self.store.lookup(local_id)
            if cur is None:
                return
            cur = cur.copy()
            cur.upload_url, cur.upload_for, cur.upload_offset = url, path, offset
            self.store.append([cur])

    def _abandon(self, url: str) -> None:
        """DELETE an upload nobody will finish; best effort (else it expires on the server)."""
        try:
            chunk = max(self.policy.upload_chunk_bytes, 1)
            uploader = self._uploader or self.remote.uploader(chunk)
            if uploader is not None:
                uploader.abandon(url)
        except RemoteError as exc:
            stop = stop_for(exc)
            if stop is not None and stop.skipped in (Stop.AUTH, Stop.BACKOFF):
                raise stop from None

    # ---- batches (6.3) ---------------------------------------------------------------------------
    def _batch_wanted(self) -> bool:
        return hasattr(self.remote, "batch") and worth_asking(self.pull_state, "batch", time.time())

    def _push_batched(
        self, batchable: list[str], now: _dt.datetime, max_wait: float
    ) -> list[Job]:
        """Send the jobs whose push carries no audio in batches of up to BATCH_MAX_OPS (and
        BATCH_MAX_BYTES); each result is handled as the answer to the job's own request. Returns
        the jobs left to send one by one (all of them when the server has no batch endpoint,
        and those that came to need a request of their own since the pass began).

        A batch is sent once the answer to the one before has come (so nothing is sent after a
        503, a 401 or a 404 there), and the server works on it while the pass handles that
        answer: the server's time and the agent's overlap (a fifth of a first sync)."""
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, BATCH_SWITCH_INTERVAL))
        try:
            return self._send_batches(batchable, now, max_wait)
        finally:
            sys.setswitchinterval(switch)

    def _send_batches(
        self, batchable: list[str], now: _dt.datetime, max_wait: float
    ) -> list[Job]:
        alone: list[Job] = []
        batches = self._batches(batchable, now, max_wait, alone)
        upcoming = next(batches, None)  # (the creates to mark first, or None, batch)
        if upcoming is not None and upcoming[0]:
            self.journal.flush(marks=upcoming[0])  # durable before the batch is sent
        sending: tuple[_Batch, _Call] | None = None
        stopped = False
        try:
            while True:
                group = upcoming[1] if upcoming is not None else None
                if group is not None and self.should_stop():
                    group, stopped = None, True
                answers = self._answers(*sending) if sending is not None else None
                following = None
                if group is not None:
                    following = (group, _Call(self.remote.batch_results, [op for _, op in group]))
                    # While the server works on it: the next batch's jobs read (their creates
                    # marked, durably, with the outcomes so far), and the last answer handled.
                    upcoming = next(batches, None)
                    if upcoming is not None and upcoming[0]:
                        self.journal.flush(marks=upcoming[0])
                if sending is not None and answers is not None:
                    self._handle(sending[0], answers)
                sending = following
                if sending is None:
                    break
        except BatchNotOffered:
            self.pull_state["batch"] = {"offered": False, "checked_at": time.time()}
            log.info("the server has no batch endpoint: one request per job")
            left = [snap for snap, _ in sending[0]] if sending is not None else []
            left += [snap for snap, _ in upcoming[1]] if upcoming is not None else []
            left += [snap for _, more in batches for snap, _ in more]
            return alone + left
        finally:
            if sending is not None:
                sending[1].join()  # never a request left running on the session
        if stopped:
            return []  # nothing goes alone either
        self.pull_state["batch"] = {"offered": True, "checked_at": time.time()}
        return alone

    def _batches(
        self, batchable: list[str], now: _dt.datetime, max_wait: float, alone: list[Job]
    ) -> Iterator[tuple[list[Job] | None, _Batch]]:
        """(the creates to mark before it is sent, or None, batch) for each batch to send,
        MARK_AHEAD jobs read (and their creates marked in one fsynced write) at a time; jobs
        that came to need a request of their own go to `alone`."""
        for first in range(0, len(batchable), MARK_AHEAD):
            snaps = self._batch_snapshots(batchable[first : first + MARK_AHEAD], now, max_wait)
            alone += [snap for snap, op in snaps if op is None]
            chunk = [(snap, op) for snap, op in snaps if op is not None]
            marks: list[Job] | None = [snap for snap, _ in chunk]
            for group in _groups_by_size(chunk):
                yield marks, group
                marks = None

    def _batch_snapshots(
        self, local_ids: list[str], now: _dt.datetime, max_wait: float
    ) -> list[tuple[Job, tuple[str, bytes] | None]]:
        """Copies of the jobs still due, as they are now, each with its batch operation (None
        when it has come to need a request of its own: audio added, deleted before created)."""
        if self.journal.sparse:
            current: Any = {lid: self.store.lookup(lid) for lid in local_ids}
        else:
            current = self.store.refresh()
        out = []
        for local_id in local_ids:
            job = current.get(local_id)
            if job is not None and is_due(job, now, max_wait):
                snap = job.clone()
                out.append((snap, _encoded_operation(snap)))
        return out

    def _answers(self, group: _Batch, call: _Call) -> Iterable[Any] | None:
        """The answers to a batch sent, one per job (read from the results as they are
        handled); None when it was sent again in halves (a 413), their answers handled. Raises
        StopPass for the batch's own 401/403/429/503 and the like, and BatchNotOffered."""
        try:
            results: list[Any] = call.wait()
            return self.remote.batch_answers([op for _, op in group], results)
        except BatchTooLarge:
            if len(group) == 1:
                return [Permanent("POST /batch: the server refused the operation as too large")]
            for half in (group[: len(group) // 2], group[len(group) // 2 :]):
                try:
                    call = _Call(self.remote.batch_results, [op for _, op in half])
                    got = self._answers(half, call)
                except BatchNotOffered:
                    # After a 413 for the same endpoint: an error for these jobs, not a
                    # reason to send them (or the half already answered) again one by one.
                    stopped = Transient("POST /batch: the server stopped offering batches")
                    got = [stopped] * len(half)
                if got is not None:
                    self._handle(half, got)
            return None
        except RemoteError as exc:
            raise_if_stops(exc)
            return [exc] * len(group)  # the whole batch failed: an error for each job

    def _handle(self, group: _Batch, answers: Iterable[Any]) -> None:
        # One write for the batch's outcomes (with the next batch's marks), not one per 200.
        self.journal.holding = True
        try:
            for (snap, _), answer in zip(group, answers, strict=True):
                self.push_one(snap, _Answered(answer))
        finally:
            self.journal.holding = False
        self._progressed(len(group))

    # ---- one job ---------------------------------------------------------------------------------
    def push_one(self, snap: Job, via: Any = None) -> None:
        """Push one job; `via` answers in place of the server (a batch's result for it)."""
        self.via = via if via is not None else self.remote
        try:
            self._push_one(snap)
        except _UploadStopped:
            # Stopped between chunks (the audio changed, or the daemon stops): no error; the
            # next pass resumes it, or abandons it for the new audio.
            self.summary.again = True

    def _push_one(self, snap: Job) -> None:
        try:
            if snap.sync_status == PENDING_DELETION:
                self._push_delete(snap)
            elif snap.server_id is None or snap.error_kind == UNCONFIRMED:
                self._push_create(snap)
            else:
                self._push_update(snap)
        except RemoteError as exc:
            # Its frames are not needed: dropped now, they form no cycle for the collector the
            # pass runs without (a batch's answers raise one error object for 500 jobs).
            exc.__traceback__ = None
            if not isinstance(exc, (Offline, TLSFailure, AuthRefused, BackOff, Permanent, Gone)):
                self.journal.unsent.discard(snap.local_id)  # it may have been stored: keep create_sent
            raise_if_stops(exc)
            self._failure(snap, exc)

    def _push_create(self, snap: Job) -> None:
        audio, upload, digest = snap.audio_file, None, None
        if audio and self._wants_upload(audio):
            upload, digest = self._upload(snap, audio)
            audio = None
        if upload is None:
            sj = self.via.create(snap.local_id, snap.text, snap.metadata, audio)
        else:
            sj = self.via.create(snap.local_id, snap.text, snap.metadata, None, upload=upload)
            _check_uploaded(sj, digest)
        self.journal.unsent.discard(snap.local_id)
        if sj.local_id is not None and sj.local_id.lower() != snap.local_id:
            raise Transient(
                f"POST /jobs: the server answered with another job ({sj.local_id[:64]!r})"
            )
        holder = self.journal.holder_of(sj.id)
        if holder is not None and holder != snap.local_id:
            # One server_id never belongs to two local jobs (6.3): binding it here as well would
            # let a delete of either job remove the other's server copy.
            raise Transient(
                f"POST /jobs: the server answered with job {sj.id[:64]!r}, which belongs to local "
                f"job {holder}"
            )
        self.journal.bind(sj.id, snap.local_id)
        self.summary.created += 1
        log.job_line("created", snap.local_id)
        audio_on_server = snap.audio_file
        if sj.audio is None:
            audio_on_server = None
        elif snap.audio_file and sj.audio.get("sha256") not in (
            None,
            digest or file_sha256(snap.audio_file),  # an upload's digest: no fifth hash pass
        ):
            audio_on_server = None  # an earlier POST whose answer was lost carried other audio
        self.journal.record(Pushed(snap, sj, audio_on_server, created=True))

    def _push_update(self, snap: Job) -> None:
        fields, send_audio = changed_fields(snap)
        assert snap.server_id is not None
        if send_audio and self._wants_upload(send_audio):
            upload, digest = self._upload(snap, send_audio)
            sj = self.via.update(snap.server_id, fields, None, upload=upload)
            _check_uploaded(sj, digest)
        else:
            sj = self.via.update(snap.server_id, fields, send_audio)
        self.summary.updated += 1
        sent = [*sorted(fields), *(["audio"] if send_audio else [])]
        log.job_line("updated", snap.local_id, ", ".join(sent))
        audio_on_server = (
            snap.audio_file
            if (send_audio or snap.audio_sent == snap.audio_file or "audio" in fields)
            else snap.audio_sent
        )
        self.journal.record(Pushed(snap, sj, audio_on_server, created=False))

    def _push_delete(self, snap: Job) -> None:
        if snap.upload_url:
            self._abandon(snap.upload_url)
        server_id = snap.server_id
        if server_id is None and snap.create_sent:
            # Its create may have reached the server (answer lost): the idempotent POST finds
            # the server copy (or makes one) so that it can be deleted.
            # An empty body: the server answers a repeat with the stored job whatever we send.
            try:
                server_id = self.via.create(snap.local_id, "", {}, None).id
            except Transient as exc:
                server_id = usable_id_in(exc)  # an invalid answer naming the copy still names it
                if server_id is None:
                    raise
        if server_id is not None:
            self.via.delete(server_id)
            self.summary.deleted_remote += 1
        log.job_line("deleted", snap.local_id)
        self.journal.record(DeletedOnServer(snap.local_id))

    def _failure(self, snap: Job, exc: RemoteError) -> None:
        deleting = snap.sync_status == PENDING_DELETION
        # A 404 on PATCH: the server lost the job. On POST: the URL is wrong (another 4xx).
        gone = isinstance(exc, Gone) and not deleting and snap.server_id is not None
        permanent = isinstance(exc, (Permanent, Gone))
        if permanent:
            self.summary.failed += 1
        else:
            self.summary.errors += 1
        message = str(exc)
        if isinstance(exc, Gone) and not gone:
            message += "; check server_url"
        if gone:
            message = "the job is gone on the server (404); `jobsyncd retry` creates it again"
        log.warning(f"job {snap.local_id}: {message}")
        log.job_line("failed" if permanent else "error", snap.local_id)
        # An invalid answer to a create may still name the server copy by a valid id: record it
        # (6.4), so that a later update or delete reaches that copy instead of making another.
        bind_id = usable_id_in(exc) if snap.server_id is None and not deleting else None
        if bind_id is not None:
            holder = self.journal.holder_of(bind_id)
            if holder is not None and holder != snap.local_id:
                bind_id = None
            else:
                self.journal.bind(bind_id, snap.local_id)
        self.journal.record(PushFailed(snap, message, permanent, gone, bind_id))


def usable_id_in(exc: BaseException) -> str | None:
    """The valid server id an invalid job object in an answer carried (remote's
    InvalidJobObject.server_id), else None."""
    server_id = getattr(exc, "server_id", None)
    return server_id if isinstance(server_id, str) and server_id else None


def _batchable(job: Job) -> bool:
    """Whether the job's push goes in a batch: it sends no audio, and it is no delete whose
    create may have reached the server without an answer (that one finds its copy first)."""
    if job.sync_status == PENDING_DELETION:
        return job.server_id is not None
    if job.server_id is None or job.error_kind == UNCONFIRMED:
        return not job.audio_file
    return changed_fields(job)[1] is None


def _batch_operation(job: Job) -> dict[str, Any] | None:
    """The job's push as one batch operation, or None when it must go alone (as _batchable
    says, with what a PATCH carries worked out once)."""
    if job.sync_status == PENDING_DELETION:
        return {"op": "delete", "id": job.server_id} if job.server_id is not None else None
    if job.server_id is None or job.error_kind == UNCONFIRMED:
        if job.audio_file:
            return None
        return {"op": "create", "local_id": job.local_id, "text": job.text, "metadata": job.metadata}
    fields, send_audio = changed_fields(job)
    return {"op": "update", "id": job.server_id, "fields": fields} if send_audio is None else None


def _encoded_operation(job: Job) -> tuple[str, bytes] | None:
    """(kind, the operation as JSON) for remote.batch, encoded once (its size splits batches)."""
    op = _batch_operation(job)
    if op is None:
        return None
    try:
        return op["op"], compact_json(op, allow_nan=False).encode()
    except (ValueError, UnicodeEncodeError):
        # Not JSON (a lone surrogate, NaN): it goes alone and fails as its own request does,
        # rather than making every batch it is in fail.
        return None


def _groups_by_size(
    ops: list[tuple[Job, tuple[str, bytes]]],
) -> Iterator[list[tuple[Job, tuple[str, bytes]]]]:
    """Split a chunk into batches of at most BATCH_MAX_OPS operations whose body stays under
    BATCH_MAX_BYTES (an operation too large for one goes alone, and the server answers 413
    for it as for its own request)."""
    group: list[tuple[Job, tuple[str, bytes]]] = []
    size = 0
    for item in ops:
        op_size = len(item[1][1]) + 1
        if group and (size + op_size > BATCH_MAX_BYTES or len(group) >= BATCH_MAX_OPS):
            yield group
            group, size = [], 0
        group.append(item)
        size += op_size
    if group:
        yield group


class _Call:
    """A function called in a thread of its own (remote.batch: the server works on one batch
    while the pass handles the answers to the one before)."""

    def __init__(self, function: Callable[[Any], Any], argument: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(function, argument), name="jobsyncd-batch", daemon=True
        )
        self.thread.start()

    def _run(self, function: Callable[[Any], Any], argument: Any) -> None:
        try:
            self.result = function(argument)
        except BaseException as exc:  # handed to the caller of wait()
            self.error = exc

    def join(self) -> None:
        self.thread.join()

    def wait(self) -> Any:
        self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.result


class _UploadStopped(Exception):
    """A resumable upload stopped between chunks (the audio changed, or the pass stops)."""


def _check_uploaded(sj: ServerJob, digest: str | None) -> None:
    """The server's sha256 of an attached upload must be the local file's (6.8)."""
    theirs = sj.audio.get("sha256") if isinstance(sj.audio, dict) else None
    if digest is not None and theirs is not None and theirs != digest:
        raise Transient(
            f"the server's copy of the audio has sha256 {str(theirs)[:64]}, not the file's {digest}"
        )


class _Answered:
    """Stands in for the server in a push: gives the answer a batch already brought."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def _give(self) -> Any:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    def create(self, *args: Any) -> Any:
        return self._give()

    def update(self, *args: Any) -> Any:
        return self._give()

    def delete(self, *args: Any) -> Any:
        return self._give()
