"""One sync pass (contract section 6): push each due job, pull the listing, detect server deletions.

`run_pass(store, remote, policy)` knows no Click, no config file and no HTTP details: it sorts
the remote's error kinds. It never holds the store lock during network I/O; outcomes are written
in batches, each applied to the job's *current* record, so an edit made while its push was in
flight stays pending (compared by `rev`). Deletion is decided against what the last sync
recorded (vdirsyncer's rule): only a job `synced` when the pass began, absent from a complete
listing and confirmed 404 by a GET is removed; a listing that lacks every such job trips the
deletion guard (vdirsyncer's StorageEmpty) unless forced.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import gc
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from . import audio, lifecycle, log
from .api import (
    AnswerTooLarge,
    AuthRefused,
    BackOff,
    BatchNotOffered,
    BatchTooLarge,
    FeedGone,
    FeedNotOffered,
    Gone,
    NotAFeed,
    NotModified,
    Offline,
    Permanent,
    RemoteAPI,
    RemoteError,
    ServerJob,
    Stop,
    TLSFailure,
    Tombstone,
    Transient,
)
from .lifecycle import ERROR, FAILED, PENDING, PENDING_DELETION, SYNCED, ErrorKind
from .model import (
    Job,
    backoff_delay,
    compact_json,
    is_uuid,
    new_local_id,
    parse_rfc3339,
    rfc3339,
    utc_now,
)
from .store import Store

P = ParamSpec("P")
R = TypeVar("R")

BATCH_MAX_OPS = 500
BATCH_MAX_BYTES = (8 << 20) - 64 * 1024  # the server's 8 MiB, less room for the envelope
# Jobs whose creates are marked (create_sent, fsynced) in one write before their batches go:
# one fsync per four batches, not per batch (at 5 ms each, a second of 100,000 jobs).
MARK_AHEAD = 4 * BATCH_MAX_OPS
FEED_PAGE_LIMIT = 1000  # a first sync reads its own creates back: fewer pages, fewer writes
SPARSE_MAX_DUE = 32  # at most this many due jobs are pushed without folding the store
SPARSE_MAX_CHANGES = 64  # a feed read this small is applied without folding the store
FEED_MAX_STALLS = 3  # pages in a row with `more` but no change: a feed that loops is cut off
FEED_PROBE_SECONDS = 24 * 3600  # a server without the feed is asked again after a day

FLUSH_EVERY_JOBS = 200
# error_kind of a job bound to the id an invalid create answer named: created again until valid
UNCONFIRMED = ErrorKind.UNCONFIRMED.value
FLUSH_EVERY_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Policy:
    max_retries: int = 5
    backoff_base_seconds: float = 15.0
    force_delete: bool = False
    # --reupload: synced jobs a complete listing lacks go back to pending, to be created again
    reupload: bool = False
    # audio larger than this goes up as a resumable upload when the server offers it; 0: never
    upload_chunk_bytes: int = 4 << 20


@dataclasses.dataclass
class PassSummary:
    ok: bool = True
    created: int = 0
    updated: int = 0
    deleted_remote: int = 0
    deleted_locally: int = 0
    pulled: int = 0
    reuploaded: int = 0
    errors: int = 0
    failed: int = 0
    skipped: str | None = None
    deletion_guard: bool = False
    handed_to_daemon: int | None = None
    # Not part of the printed summary:
    retry_after: float | None = dataclasses.field(default=None, repr=False)
    message: str | None = dataclasses.field(default=None, repr=False)
    again: bool = dataclasses.field(default=False, repr=False)
    message_logged: bool = dataclasses.field(default=False, repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "created": self.created,
            "updated": self.updated,
            "deleted_remote": self.deleted_remote,
            "deleted_locally": self.deleted_locally,
            "pulled": self.pulled,
            "reuploaded": self.reuploaded,
            "errors": self.errors,
            "failed": self.failed,
            "skipped": self.skipped,
            "deletion_guard": self.deletion_guard,
            "handed_to_daemon": self.handed_to_daemon,
        }


class _StopPass(Exception):
    def __init__(self, skipped: Stop, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.skipped = skipped
        self.retry_after = retry_after


def _stop_for(exc: RemoteError) -> _StopPass | None:
    """The errors that stop the whole pass (6.1, 6.2); None for per-job errors."""
    stop = Stop.for_error(exc)
    if stop is None:
        return None
    return _StopPass(stop, str(exc), exc.retry_after if isinstance(exc, BackOff) else None)


def longest_backoff(policy: Policy) -> float:
    """The furthest a job's next attempt can legitimately be: base * 2^(max_retries-1) (6.9)."""
    return policy.backoff_base_seconds * float(1 << min(max(policy.max_retries - 1, 0), 30))


def changed_fields(job: Job) -> tuple[dict[str, Any], str | None]:
    """What a PATCH of `job` carries: the fields changed since the last sync (`metadata` whole),
    and the audio file to send when the audio changed (else None)."""
    base = job.base or {}
    fields: dict[str, Any] = {}
    if job.text != base.get("text"):
        fields["text"] = job.text
    if job.metadata != base.get("metadata"):
        fields["metadata"] = job.metadata
    send_audio = job.audio_file if job.audio_file and job.audio_file != job.audio_sent else None
    if job.audio_file is None and job.audio_sent is not None:
        fields["audio"] = None  # `update --no-audio`: the server removes its copy
    return fields, send_audio


def _is_due(job: Job, now: _dt.datetime, max_wait: float | None = None) -> bool:
    """Whether a pass pushes `job` now. A next attempt further away than `max_wait` seconds was
    recorded under a clock that was ahead (or by hand): it counts as over at once (6.9), so a
    clock set back never strands a job."""
    status = job.sync_status
    if status == PENDING or (status == PENDING_DELETION and not job.next_attempt_at):
        return True
    if status in (ERROR, PENDING_DELETION):
        if not job.next_attempt_at:
            return True
        try:
            wait = (parse_rfc3339(job.next_attempt_at) - now).total_seconds()
        except (ValueError, OverflowError):
            return True
        return wait <= 0 or (max_wait is not None and wait > max_wait)
    return False


def _file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


class _Pass:
    def __init__(
        self,
        store: Store,
        remote: RemoteAPI,
        policy: Policy,
        now: Callable[[], _dt.datetime],
        rng: random.Random,
        should_stop: Callable[[], bool],
        progress: Callable[[int], Any] | None,
        pull_state: dict[str, Any],
    ) -> None:
        self.store = store
        self.remote = remote
        self.policy = policy
        self.now = now
        self.rng = rng
        self.should_stop = should_stop
        self.progress = progress
        self.pull_state = pull_state
        self.summary = PassSummary()
        self.purged_audio: dict[str, str] = {}  # audio copies to remove once their records are gone
        # Marked create_sent by this pass but not POSTed, or surely not stored: unmarked at the
        # end, so that a delete of a job that never reached the server just drops it.
        self.unsent: set[str] = set()
        self.outcomes: list[Callable[[_Overlay], tuple[list[Job], list[str]]]] = []
        self.last_flush = time.monotonic()
        self._holders: dict[str, str] | None = None  # sparse: server_id -> local_id, this pass
        self._bound: _IdFilter | None = None  # folded store: the server ids bound, built when needed
        self._unwritten: dict[str, str] = {}  # folded store: bindings of outcomes not yet written
        self.via: Any = remote  # what a push talks to: the server, or a batch's answers
        self._uploader: Any = None  # upload.Uploader once the server offers uploads
        self.upload_progress: Callable[[int, int], Any] | None = None
        self._uploads_checked = False
        self._holding = False  # handling a batch's answers: written with the next batch
        self._stamp: str | None = None  # last_sync_attempt_at of the outcomes being written
        self.done = 0
        # A pull of a few changes into a store not folded: jobs are looked up one by one in the
        # file (a few ms each) instead of folding 100,000 of them (most of a second).
        self.sparse = False
        self._index: dict[str, str] | None = None

    def _holder_of(self, server_id: str) -> str | None:
        """The local job bound to `server_id` (the store as read, plus this pass's bindings)."""
        if self.sparse:
            self._holders = self._holders if self._holders is not None else {}
            if self._holders is not None and server_id in self._holders:
                return self._holders[server_id]
            job = self.store.lookup_server_id(server_id)
            return job.local_id if job is not None else None
        if server_id in self._unwritten:
            return self._unwritten[server_id]
        if self._bound is None:
            # A Bloom filter of the ids bound, not a dict of them: 1 MiB, not 5 at 100,000 jobs.
            self._bound = _IdFilter()
            for job in self.store.refresh().values():
                if job.server_id is not None:
                    self._bound.add(job.server_id)
        if not self._bound.may_hold(server_id):
            return None
        return next(
            (j.local_id for j in self.store.refresh().values() if j.server_id == server_id), None
        )

    def _bind(self, server_id: str, local_id: str) -> None:
        """Note that this pass binds `server_id` to `local_id` (written with its outcome)."""
        if self.sparse:
            if self._holders is not None:
                self._holders[server_id] = local_id
            return
        self._unwritten[server_id] = local_id
        if self._bound is not None:
            self._bound.add(server_id)

    # ---- writing outcomes ---------------------------------------------------------------------
    def _record(self, apply: Callable[[_Overlay], tuple[list[Job], list[str]]]) -> None:
        self.outcomes.append(apply)
        if not self._holding and (
            len(self.outcomes) >= FLUSH_EVERY_JOBS
            or time.monotonic() - self.last_flush > FLUSH_EVERY_SECONDS
        ):
            self.flush()

    def _flush_stamp(self) -> str:
        """The time the outcomes being written were recorded: one per write, not per job."""
        if self._stamp is None:
            self._stamp = rfc3339(self.now())
        return self._stamp

    def flush(self, marks: list[Job] | None = None) -> None:
        """Write the outcomes recorded so far, and (`marks`) that the creates among those jobs
        may reach the server (create_sent), as one fsynced write: a batch's marks go with the
        outcomes of the batch before it."""
        self.last_flush = time.monotonic()
        to_mark = [
            j
            for j in marks or ()
            if j.server_id is None and not j.create_sent and j.sync_status != PENDING_DELETION
        ]
        if not self.outcomes and not to_mark:
            return
        outcomes, self.outcomes = self.outcomes, []
        self._stamp = None
        with self.store.locked():
            jobs: Any = _StoreLookup(self.store) if self.sparse else self.store.refresh()
            changed: dict[str, Job] = {}
            purged: list[str] = []
            view = _Overlay(jobs, changed, purged)
            for apply in outcomes:
                upd, gone = apply(view)
                for job in upd:
                    changed[job.local_id] = job
                for local_id in gone:
                    changed.pop(local_id, None)
                    view.purge(local_id)
            for snap in to_mark:
                cur = view.get(snap.local_id)
                if cur is not None and not cur.create_sent:
                    cur = cur.clone()
                    cur.create_sent = True
                    changed[cur.local_id] = cur
                    self.unsent.add(snap.local_id)
                snap.create_sent = True
            # Compacted once at the end of the pass, not whenever the dead lines add up.
            # The store keeps these fresh versions as they are (nobody else holds them).
            self.store.append(list(changed.values()), purged, compact=False, adopt=True)
            self._unwritten.clear()  # bound in the store now (or not at all: the job went)
        # Audio files of purged jobs go after their records (a crash in between leaves an
        # orphan file, never a record pointing at a missing one).
        for local_id, path in list(self.purged_audio.items()):
            problem = audio.remove_managed(self.store.data_dir, path)
            if problem:
                log.warning(problem)
            del self.purged_audio[local_id]

    # ---- push ------------------------------------------------------------------------------------
    def push(self, candidates: list[str] | None = None) -> None:
        """Push the due jobs; `candidates` (sparse mode): the only local_ids that may be due,
        looked up one by one instead of folding the store."""
        now = self.now()
        if candidates is not None:
            found = (self.store.lookup(lid) for lid in candidates)
            jobs = {j.local_id: j for j in found if j is not None}
        else:
            jobs = self.store.refresh()
        max_wait = longest_backoff(self.policy)
        due = [j for j in jobs.values() if _is_due(j, now, max_wait)]
        due.sort(key=lambda j: (j.created_at, j.local_id))
        if not due:
            return
        singles = due
        self.done = 0
        try:
            if self._batch_wanted():
                batchable = [j.local_id for j in due if _batchable(j)]
                if batchable:
                    singles = [j for j in due if not _batchable(j)]
                    # Each batch reads its jobs when it sends them: no list here keeps every
                    # job's old version alive while the store moves on (100,000 jobs: 80 MiB).
                    due = jobs = []  # type: ignore[assignment]
                    singles = self._push_batched(batchable, now, max_wait) + singles
            for first in range(0, len(singles), FLUSH_EVERY_JOBS):
                chunk = [j.copy() for j in singles[first : first + FLUSH_EVERY_JOBS]]
                self._mark_create_sent(chunk)
                for snap in chunk:
                    if self.should_stop():
                        return
                    self.push_one(snap)
                    self._progressed(1)
        finally:
            self.flush()
            self._unmark_unsent()
            self._bound = None  # the pull has its own index: not both at once

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
        state = self.pull_state.get("uploads")
        now = time.time()
        if isinstance(state, dict) and state.get("offered") is False:
            checked = state.get("checked_at")
            if isinstance(checked, (int, float)) and now - FEED_PROBE_SECONDS < checked <= now:
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
        from .upload import UploadGone

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
            stop = _stop_for(exc)
            if stop is not None and stop.skipped in (Stop.AUTH, Stop.BACKOFF):
                raise stop from None

    # ---- batches (6.3) ---------------------------------------------------------------------------
    def _batch_wanted(self) -> bool:
        return hasattr(self.remote, "batch") and self._worth_asking("batch")

    def _worth_asking(self, feature: str) -> bool:
        """Whether to use (or ask again for) a feature the server may offer: yes unless it said
        no within the last day; a "no" recorded in the future (a clock set back) is stale."""
        state = self.pull_state.get(feature)
        if not isinstance(state, dict) or state.get("offered") is not False:
            return True
        checked, now = state.get("checked_at"), time.time()
        return not isinstance(checked, (int, float)) or not now - FEED_PROBE_SECONDS < checked <= now

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
        alone: list[Job] = []
        batches = self._batches(batchable, now, max_wait, alone)
        upcoming = next(batches, None)  # (the creates to mark first, or None, batch)
        if upcoming is not None and upcoming[0]:
            self.flush(marks=upcoming[0])  # durable before the batch is sent
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
                        self.flush(marks=upcoming[0])
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
        if self.sparse:
            current: Any = {lid: self.store.lookup(lid) for lid in local_ids}
        else:
            current = self.store.refresh()
        out = []
        for local_id in local_ids:
            job = current.get(local_id)
            if job is not None and _is_due(job, now, max_wait):
                snap = job.clone()
                out.append((snap, _encoded_operation(snap)))
        return out

    def _answers(self, group: _Batch, call: _Call) -> Iterable[Any] | None:
        """The answers to a batch sent, one per job (read from the results as they are
        handled); None when it was sent again in halves (a 413), their answers handled. Raises
        _StopPass for the batch's own 401/403/429/503 and the like, and BatchNotOffered."""
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
            stop = _stop_for(exc)
            if stop is not None:
                raise stop from None
            return [exc] * len(group)  # the whole batch failed: an error for each job

    def _handle(self, group: _Batch, answers: Iterable[Any]) -> None:
        # One write for the batch's outcomes (with the next batch's marks), not one per 200.
        self._holding = True
        try:
            for (snap, _), answer in zip(group, answers, strict=True):
                self.push_one(snap, _Answered(answer))
        finally:
            self._holding = False
        self._progressed(len(group))

    def _unmark_unsent(self) -> None:
        if not self.unsent:
            return
        with self.store.locked():
            unmarked = []
            for local_id in self.unsent:
                cur = self.store.lookup(local_id)
                if cur is not None and cur.server_id is None and cur.create_sent:
                    cur = cur.copy()
                    cur.create_sent = False
                    unmarked.append(cur)
            self.store.append(unmarked)
        self.unsent.clear()

    def _mark_create_sent(self, batch: list[Job]) -> None:
        """Before any POST, record durably (one write per batch) that it may reach the server:
        a delete that comes while a create is in flight, or after its answer was lost, then
        knows to find the server copy."""
        to_mark = [
            j
            for j in batch
            if j.server_id is None and not j.create_sent and j.sync_status != PENDING_DELETION
        ]
        if not to_mark:
            return
        with self.store.locked():
            marked = []
            for snap in to_mark:
                cur = self.store.lookup(snap.local_id)
                if cur is not None and not cur.create_sent:
                    cur = cur.copy()
                    cur.create_sent = True
                    marked.append(cur)
                    self.unsent.add(snap.local_id)
                snap.create_sent = True
            self.store.append(marked)

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
                self.unsent.discard(snap.local_id)  # it may have been stored: keep create_sent
            stop = _stop_for(exc)
            if stop is not None:
                raise stop from None
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
        self.unsent.discard(snap.local_id)
        if sj.local_id is not None and sj.local_id.lower() != snap.local_id:
            raise Transient(
                f"POST /jobs: the server answered with another job ({sj.local_id[:64]!r})"
            )
        holder = self._holder_of(sj.id)
        if holder is not None and holder != snap.local_id:
            # One server_id never belongs to two local jobs (6.3): binding it here as well would
            # let a delete of either job remove the other's server copy.
            raise Transient(
                f"POST /jobs: the server answered with job {sj.id[:64]!r}, which belongs to local "
                f"job {holder}"
            )
        self._bind(sj.id, snap.local_id)
        self.summary.created += 1
        log.job_line("created", snap.local_id)
        audio_on_server = snap.audio_file
        if sj.audio is None:
            audio_on_server = None
        elif snap.audio_file and sj.audio.get("sha256") not in (
            None,
            digest or _file_sha256(snap.audio_file),  # an upload's digest: no fifth hash pass
        ):
            audio_on_server = None  # an earlier POST whose answer was lost carried other audio
        self._record(lambda view: self._apply_synced(view, snap, sj, audio_on_server, created=True))

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
        log.job_line("updated", snap.local_id, ", ".join([*sorted(fields), *(["audio"] if send_audio else [])]))
        audio_on_server = (
            snap.audio_file
            if (send_audio or snap.audio_sent == snap.audio_file or "audio" in fields)
            else snap.audio_sent
        )
        self._record(
            lambda view: self._apply_synced(view, snap, sj, audio_on_server, created=False)
        )

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
                server_id = _usable_id_in(exc)  # an invalid answer naming the copy still names it
                if server_id is None:
                    raise
        if server_id is not None:
            self.via.delete(server_id)
            self.summary.deleted_remote += 1
        log.job_line("deleted", snap.local_id)

        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            cur = view.get(snap.local_id)
            if cur is None:
                return [], []
            self.purged_audio[cur.local_id] = cur.audio_file or ""
            return [], [cur.local_id]

        self._record(apply)

    def _apply_synced(
        self,
        view: _Overlay,
        snap: Job,
        sj: ServerJob,
        audio_on_server: str | None,
        created: bool,
    ) -> tuple[list[Job], list[str]]:
        cur = view.get(snap.local_id)
        if cur is None:
            return [], []
        cur = cur.clone()
        stamp = self._flush_stamp()
        cur.server_id = sj.id
        cur.create_sent = True
        cur.server_status = sj.status
        cur.base = {"text": sj.text, "metadata": sj.metadata}
        cur.audio_sent = audio_on_server
        if cur.upload_url is not None and cur.upload_for == audio_on_server:
            cur.upload_url, cur.upload_for, cur.upload_offset = None, None, 0  # attached: done
        cur.last_sync_attempt_at = stamp
        if cur.rev == snap.rev and cur.sync_status == snap.sync_status:
            if not created:
                # A PATCH carried what changed here; whatever else the server holds (another
                # client's edit of a field we did not send) wins, as for any synced job.
                cur.text, cur.metadata = sj.text, sj.metadata
            if (
                sj.text == cur.text
                and sj.metadata == cur.metadata
                and audio_on_server == snap.audio_file
            ):
                cur = lifecycle.synced(cur)
            else:
                # The server holds another version (an earlier POST whose answer was lost):
                # ours is newer, so it stays pending and the next pass PATCHes the difference.
                cur = lifecycle.outdated_on_server(cur)
                self.summary.again = True
        else:
            self.summary.again = True  # changed while in flight: pushed by the next pass
        return [cur], []

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
        bind_id = _usable_id_in(exc) if snap.server_id is None and not deleting else None
        if bind_id is not None:
            holder = self._holder_of(bind_id)
            if holder is not None and holder != snap.local_id:
                bind_id = None
            else:
                self._bind(bind_id, snap.local_id)

        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            cur = view.get(snap.local_id)
            if cur is None or cur.rev != snap.rev:
                return [], []  # edited meanwhile: the new version gets a fresh attempt
            cur = cur.copy()
            now = self.now()
            kind = lifecycle.failure_kind(cur, gone)
            if bind_id is not None and cur.server_id is None:
                # Recorded so that a delete reaches that copy; but the create is sent again
                # (idempotent by local_id) until the server answers it with a valid job.
                cur.server_id = bind_id
                cur.create_sent = True
                kind = ErrorKind.UNCONFIRMED
            if permanent:
                return [lifecycle.failed(cur, rfc3339(now), message, kind)], []

            def next_attempt_at(retries: int) -> str:
                delay = backoff_delay(self.policy.backoff_base_seconds, retries, self.rng)
                return rfc3339(now + _dt.timedelta(seconds=delay))

            cur = lifecycle.errored(
                cur, rfc3339(now), message, kind, self.policy.max_retries, next_attempt_at
            )
            if cur.sync_status == FAILED:
                self.summary.errors -= 1
                self.summary.failed += 1
            return [cur], []

        self._record(apply)

    # ---- pull ------------------------------------------------------------------------------------
    def pull(self, begin_synced: dict[str, str] | None) -> None:
        """The change feed when the server offers it (6.7), else the whole listing (6.4)."""
        if self._feed_wanted():
            try:
                self.pull_feed(begin_synced)
                return
            except FeedNotOffered:
                self.pull_state["feed"] = {"offered": False, "checked_at": time.time()}
                self.pull_state.pop("checkpoint", None)
                log.info("the server offers no change feed: listing mode (asked again in a day)")
        self.pull_listing(begin_synced)

    def _feed_wanted(self) -> bool:
        return hasattr(self.remote, "changes") and self._worth_asking("feed")

    def pull_feed(self, begin_synced: dict[str, str] | None) -> None:
        checkpoint = self.pull_state.get("checkpoint")
        if not isinstance(checkpoint, str):
            # No checkpoint (the first pull from this server URL, or a state file lost): the
            # history behind the synced jobs here is unknown, so read as after a restore:
            # nothing is removed, and synced jobs this server lacks are created again on it.
            self._read_feed(None, begin_synced, "diverged")
            return
        try:
            self._read_feed(checkpoint, begin_synced, None)
        except FeedGone as gone:
            self.pull_state.pop("checkpoint", None)
            log.warning(
                f"the change feed cannot serve this agent's checkpoint ({gone.reason}): one full "
                "resync"
                + (
                    "; the server's history is not the one this agent saw (restored from a "
                    "backup?): nothing is removed, jobs it lost are created again"
                    if gone.reason == "diverged"
                    else ""
                )
            )
            self._read_feed(None, begin_synced, gone.reason)

    def _read_feed(  # noqa: C901 - one loop over pages with its error cases, read top to bottom
        self, since: str | None, begin_synced: dict[str, str] | None, resync: str | None
    ) -> None:
        """Read the feed from `since` to its end, applying jobs as they come; tombstones and
        rebinds are applied after the read (a job deleted and created again under the same
        local_id is rebound by its newer change, never removed by the old id's tombstone). The
        checkpoint is stored only after everything before it is applied (a crash replays)."""
        self._start_pull()
        unlisted: dict[str, str] = {}  # resync: synced when the pass began, not seen live yet
        tombstones: dict[str, str | None] = {}
        complete = False
        pages = 0
        limit = FEED_PAGE_LIMIT
        try:
            stalls = 0
            while True:
                try:
                    page = self.remote.changes(since, limit, 0)
                except AnswerTooLarge:
                    if limit == 1:
                        raise
                    limit = max(1, limit // 4)  # big jobs: fewer per page, never stuck
                    continue
                pages += 1
                if page.items and self._index is None and not self.sparse:
                    if (
                        not resync
                        and not self.store.loaded
                        and not page.more
                        and len(page.items) <= SPARSE_MAX_CHANGES
                    ):
                        self.sparse = True
                    else:
                        begin_synced = self._index_store(begin_synced)
                        if resync:
                            unlisted = {sid: lid for lid, sid in begin_synced.items()}
                live = []
                for item in page.items:
                    if isinstance(item, Tombstone):
                        tombstones[item.id] = item.local_id
                    else:
                        tombstones.pop(getattr(item, "id", None) or "", None)
                        live.append(item)
                if live:
                    self._apply_page(live, unlisted)
                stalls = stalls + 1 if (page.more and (not page.items or page.next == since)) else 0
                since = page.next
                if not page.more:
                    complete = True
                    break
                if stalls >= FEED_MAX_STALLS:
                    self.summary.ok = False
                    log.warning("the change feed keeps answering `more` without changes; stopped")
                    break
                if self.should_stop():
                    break
        except (RemoteError, FeedNotOffered) as exc:
            if isinstance(exc, FeedNotOffered) and not pages:
                raise  # no feed (any more): listing mode, from this very pass
            feed = self.pull_state.get("feed")
            confirmed = isinstance(feed, dict) and feed.get("offered") is True
            if isinstance(exc, NotAFeed) and not pages and not confirmed:
                # A server that answers every path (200, not a feed): it has no feed.
                raise FeedNotOffered() from None
            stop = _stop_for(exc) if isinstance(exc, RemoteError) else None
            if stop is not None:
                raise stop from None
            self.summary.ok = False
            self.summary.message = f"the change feed failed part-way: {exc}"
            log.warning(f"{self.summary.message}; it is read again from the last checkpoint")
            self.summary.message_logged = True
            return
        except FeedGone as exc:
            if resync is None:
                raise
            self.summary.ok = False
            log.warning(f"the change feed failed during a resync: {exc}")
            return
        finally:
            self.flush()
        feed = self.pull_state.get("feed")
        if not (isinstance(feed, dict) and feed.get("offered") is True):
            self.pull_state["feed"] = {"offered": True, "checked_at": time.time()}
        if resync and not complete:
            return  # the next pass gets 410 again and resyncs again: nothing is decided on half
        settled = self._settle_feed(begin_synced or {}, tombstones, unlisted, resync, complete)
        if settled and self.pull_state.get("checkpoint") != since:
            # Written only when it moves: a no-change pass leaves pull_state.json unwritten.
            self.pull_state["checkpoint"] = since
            self.pull_state["checkpoint_at"] = time.time()

    def _settle_feed(
        self,
        begin_synced: dict[str, str],
        tombstones: dict[str, str | None],
        unlisted: dict[str, str],
        resync: str | None,
        complete: bool,
    ) -> bool:
        """Rebinds, tombstones, and after a complete resync the jobs the server lacks. Returns
        whether the checkpoint may be stored."""
        try:
            if self._rebinds:
                self._settle_rebinds(tombstoned=set(tombstones))
            if resync == "diverged":
                # Another history: its tombstones may speak of another past; nothing is removed.
                gone = {lid: sid for sid, lid in unlisted.items()}
                if gone:
                    self._reupload(gone)
                return True
            if tombstones and not self._apply_tombstones(begin_synced, tombstones):
                return False
            if resync == "expired" and complete:
                missing = {lid: sid for sid, lid in unlisted.items() if sid not in tombstones}
                self._detect_server_deletions(begin_synced, missing)
            return True
        finally:
            self.flush()

    def _apply_tombstones(
        self, begin_synced: dict[str, str], tombstones: dict[str, str | None]
    ) -> bool:
        """Remove the synced jobs bound to tombstoned ids; False when the deletion guard trips."""
        doomed = {}
        for sid in tombstones:
            local_id = self._bound_local_id(sid)
            if local_id is not None:
                doomed[local_id] = sid
        if self.sparse:
            synced_doomed = {
                lid: sid
                for lid, sid in doomed.items()
                if (job := self.store.lookup(lid)) is not None and job.sync_status == SYNCED
            }
            others = self.store.synced_jobs_besides(set(synced_doomed), 1)
            if others is None:
                begin_synced = self._index_store(None)
                others = len(set(begin_synced) - set(synced_doomed))
            synced_total = len(synced_doomed) + others
        else:
            synced_doomed = {
                lid: sid for lid, sid in doomed.items() if begin_synced.get(lid) == sid
            }
            synced_total = len(begin_synced)
        if self.policy.reupload and synced_doomed:
            self._reupload(synced_doomed)
            return True
        if self._guard_trips(
            synced_total, len(synced_doomed), f"the change feed deletes all {synced_total}"
        ):
            return False
        for local_id, server_id in doomed.items():
            self._record(self._purge_deleted_on_server(local_id, server_id))
        return True

    def _start_pull(self) -> None:
        self._added: set[str] = set()  # server-made jobs added in this pull (a page may repeat)
        self._invalid_seen = False  # an invalid job object was skipped: nothing is removed
        # server_id -> (local_id, old server_id, server job): listed under a local job's
        # local_id while that job is bound to another server id
        self._rebinds: dict[str, tuple[str, str, ServerJob]] = {}
        self._index = None
        self.sparse = False

    def _index_store(self, begin_synced: dict[str, str] | None) -> dict[str, str]:
        """Fold the store (the server had something to say) and index it by server_id."""
        jobs = self.store.refresh()
        if begin_synced is None:
            begin_synced = _synced_ids(jobs)
        self._index = {j.server_id: j.local_id for j in jobs.values() if j.server_id is not None}
        return begin_synced

    def pull_listing(self, begin_synced: dict[str, str] | None) -> None:
        etag = self.pull_state.get("etag")
        # server_id -> local_id of the jobs synced when the pass began and not listed (yet):
        # shrinks page by page, rather than a set of every listed id growing to the whole listing.
        unlisted: dict[str, str] = {}
        self._start_pull()
        new_etag: str | None = None
        complete = False
        try:
            for page, listing_etag in self.remote.list_pages(etag):
                if self._index is None:  # the listing changed: now the store is needed
                    begin_synced = self._index_store(begin_synced)
                    unlisted = {sid: lid for lid, sid in begin_synced.items()}
                new_etag = listing_etag
                self._apply_page(page, unlisted)
                if self.should_stop():  # also the daemon's proof of progress for its watchdog
                    break
            else:
                complete = True
        except NotModified:
            return
        except RemoteError as exc:
            stop = _stop_for(exc)
            if stop is not None:
                raise stop from None
            self.summary.ok = False
            self.summary.message = f"the server listing failed part-way: {exc}"
            log.warning(f"{self.summary.message}; no job is removed in this pass")
            self.summary.message_logged = True
            self.pull_state.pop("etag", None)
            return
        finally:
            self.flush()
        try:
            if complete and self._rebinds:
                self._settle_rebinds()
            missing = {lid: sid for sid, lid in unlisted.items()}
            del unlisted
            if complete and self._invalid_seen:
                log.warning("the listing held invalid job objects: no job is removed in this pass")
            settled = (
                complete
                and not self._invalid_seen
                and self._detect_server_deletions(begin_synced or {}, missing)
            )
        finally:
            self.flush()
        if settled and new_etag:
            self.pull_state["etag"] = new_etag
        else:
            self.pull_state.pop("etag", None)

    def _apply_page(self, page: list[Any], unlisted: dict[str, str]) -> None:
        """Match each server job to a local job by `local_id` first, then by `server_id` (6.4):
        a job deleted and created again on the server under the same local_id is the same job,
        rebound to its new server id, never a second local job."""
        jobs: Any = _StoreLookup(self.store) if self.sparse else self.store.refresh()
        for sj in page:
            if not isinstance(sj, ServerJob):
                self._skip_invalid(sj, unlisted)
                continue
            unlisted.pop(sj.id, None)
            mine = jobs.get(sj.local_id.lower()) if sj.local_id else None
            if mine is not None and mine.server_id != sj.id:
                if mine.server_id is None:
                    continue  # our own create whose answer was lost: the push links it
                holder = self._bound_local_id(sj.id)
                if holder is not None and holder != mine.local_id:
                    log.warning(
                        f"server job {sj.id[:64]!r} names local job {mine.local_id} but is bound "
                        f"to local job {holder}; left as it is"
                    )
                    continue
                # Decided once the listing is complete: rebound if its old server copy is gone (a
                # restore), else it is another job that happens to carry our local_id.
                self._rebinds[sj.id] = (mine.local_id, mine.server_id, sj)
                unlisted.pop(mine.server_id, None)
                continue
            # Usually the job found by local_id is the one bound to this id: no second look-up.
            local_id = mine.local_id if mine is not None else self._bound_local_id(sj.id)
            if local_id is not None:
                cur = mine if mine is not None else jobs.get(local_id)
                if cur is not None and cur.sync_status == SYNCED and _differs(cur, sj):
                    self._record(self._take_server_copy(local_id, cur.rev, sj))
                continue
            if sj.id in self._added:
                continue
            self._added.add(sj.id)
            self._record(self._add_from_server(sj))

    def _settle_rebinds(self, tombstoned: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """A server job listed under a local job's local_id while that job is bound to another
        server id: if the old copy is gone (GET 404), the server deleted and re-created the job
        (a restore) and the local job is rebound to it (6.4); if the old copy is still there,
        the listed one is another job that happens to carry our local_id, added as new."""
        for new_id, (local_id, old_id, sj) in self._rebinds.items():
            if self.should_stop():
                return
            if old_id in tombstoned:  # the feed said the old copy is gone: no GET needed
                self._record(self._rebind(local_id, old_id, sj))
                continue
            try:
                self.remote.get(old_id)
            except Gone:
                self._record(self._rebind(local_id, old_id, sj))
                continue
            except RemoteError as exc:
                stop = _stop_for(exc)
                if stop is not None:
                    raise stop from None
                self.summary.ok = False
                log.warning(f"job {local_id}: could not check its server copy: {exc}")
                continue
            if new_id not in self._added:
                self._added.add(new_id)
                self._record(self._add_from_server(sj))

    def _bound_local_id(self, server_id: str) -> str | None:
        """The local job bound to `server_id` as the pull began (sparse: as the file says)."""
        if self.sparse:
            job = self.store.lookup_server_id(server_id)
            return job.local_id if job is not None else None
        return (self._index or {}).get(server_id)

    def _skip_invalid(self, item: Any, unlisted: dict[str, str]) -> None:
        """An invalid job object in a listing: skipped with a warning, the rest of the page
        applies, the pass is not ok and removes nothing (6.4)."""
        server_id = getattr(item, "id", None)
        reason = getattr(item, "reason", "invalid")
        if isinstance(server_id, str):
            unlisted.pop(server_id, None)
            name = f"job {server_id[:64]!r}"
        else:
            name = "a job without a usable id"
        log.warning(f"the server listing holds an invalid job object ({name}: {reason}); skipped")
        self.summary.ok = False
        self._invalid_seen = True

    def _rebind(self, local_id: str, old_server_id: str, sj: ServerJob) -> Outcome:
        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            cur = view.get(local_id)
            if cur is None or cur.server_id != old_server_id:
                return [], []
            cur = cur.copy()
            cur.server_id = sj.id
            cur.create_sent = True
            cur.base = {"text": sj.text, "metadata": sj.metadata}  # a PATCH sends what differs
            if cur.audio_file and sj.audio and sj.audio.get("sha256") == _file_sha256(cur.audio_file):
                cur.audio_sent = cur.audio_file
            else:
                cur.audio_sent = None
            if cur.sync_status == SYNCED:
                cur.text, cur.metadata, cur.server_status = sj.text, sj.metadata, sj.status
                cur.updated_at = sj.updated_at or rfc3339(self.now())
                cur.audio_sent = cur.audio_file  # server wins; audio is never downloaded
            elif cur.sync_status == FAILED and cur.error_kind == ErrorKind.GONE:
                # It failed because the server lost it; the server has it again: push the edit.
                cur = lifecycle.recovered(cur)
            cur.server_status = sj.status
            self.summary.pulled += 1
            log.job_line("pulled", local_id, f"rebound to server id {sj.id[:64]}")
            return [cur], []

        return apply

    def _take_server_copy(self, local_id: str, rev: int, sj: ServerJob) -> Outcome:
        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            cur = view.get(local_id)
            if cur is None or cur.sync_status != SYNCED or cur.rev != rev or not _differs(cur, sj):
                return [], []
            cur = cur.copy()
            cur.text, cur.metadata, cur.server_status = sj.text, sj.metadata, sj.status
            cur.base = {"text": sj.text, "metadata": sj.metadata}
            cur.updated_at = sj.updated_at or rfc3339(self.now())
            self.summary.pulled += 1
            log.job_line("pulled", local_id)
            return [cur], []

        return apply

    def _add_from_server(self, sj: ServerJob) -> Outcome:
        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            if view.has_server_id(sj.id):
                return [], []
            wanted = sj.local_id.lower() if sj.local_id else None
            local_id = (
                wanted
                if wanted and is_uuid(wanted) and view.get(wanted) is None
                else new_local_id()
            )
            stamp = rfc3339(self.now())
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
            self.summary.pulled += 1
            log.job_line("pulled", local_id)
            return [job], []

        return apply

    def _detect_server_deletions(
        self, begin_synced: dict[str, str], missing: dict[str, str]
    ) -> bool:
        """`missing`: local_id -> server_id of the jobs synced when the pass began that a
        complete listing lacks. Returns True when the pull is fully settled (the ETag may be
        trusted next time)."""
        if not missing:
            return True
        if self.policy.reupload:
            self._reupload(missing)
            return False
        if self._guard_trips(
            len(begin_synced),
            len(missing),
            f"the server listing holds none of the {len(begin_synced)}",
        ):
            return False
        settled = True
        for local_id, server_id in missing.items():
            if self.should_stop():
                return False
            try:
                sj = self.remote.get(server_id)
            except Gone:
                self._record(self._purge_deleted_on_server(local_id, server_id))
                continue
            except RemoteError as exc:
                stop = _stop_for(exc)
                if stop is not None:
                    raise stop from None
                self.summary.ok = False
                settled = False
                log.warning(f"job {local_id}: could not confirm it on the server: {exc}")
                continue
            if sj.id == server_id:
                self._record(self._take_server_copy_any_rev(local_id, sj))
            settled = False  # the listing and the job disagree: list again next time
        return settled

    def _guard_trips(self, synced: int, going: int, what: str) -> bool:
        """The deletion guard (vdirsyncer's StorageEmpty): removing every one of the (at least
        2) jobs synced when the pass began is refused unless --force-delete, with both ways
        out named. `what` starts the message ("the server listing holds none of the 3")."""
        if synced < 2 or going != synced or self.policy.force_delete:
            return False
        self.summary.deletion_guard = True
        self.summary.ok = False
        self.summary.message = (
            f"{what} synced jobs; nothing was removed. Run `jobsyncd sync --reupload` if the "
            "server was restored from a backup (they are created again), or `jobsyncd sync "
            "--force-delete` if it really was emptied (they are removed here too)"
        )
        log.warning(self.summary.message)
        self.summary.message_logged = True
        return True

    def _reupload(self, missing: dict[str, str]) -> None:
        """--reupload: the synced jobs a complete listing lacks go back to `pending` without a
        server_id; the next pass creates them again by local_id (idempotent: a job the server
        does hold under that local_id is answered, not duplicated). No confirming GET: sending a
        job the server still has costs one request and changes nothing."""
        for local_id, server_id in missing.items():
            self._record(self._back_to_pending(local_id, server_id))
        self.flush()
        if self.summary.reuploaded:
            log.warning(
                f"{self.summary.reuploaded} synced jobs the server no longer has went back to "
                "pending; the next pass creates them again"
            )

    def _back_to_pending(self, local_id: str, server_id: str) -> Outcome:
        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            cur = view.get(local_id)
            if cur is None or cur.sync_status != SYNCED or cur.server_id != server_id:
                return [], []  # changed locally meanwhile: it goes its own way
            cur = lifecycle.reuploaded(cur)
            self.summary.reuploaded += 1
            log.job_line("reuploaded", local_id)
            return [cur], []

        return apply

    def _take_server_copy_any_rev(self, local_id: str, sj: ServerJob) -> Outcome:
        cur = self.store.lookup(local_id) if self.sparse else self.store.jobs.get(local_id)
        return self._take_server_copy(local_id, cur.rev if cur else -1, sj)

    def _purge_deleted_on_server(self, local_id: str, server_id: str) -> Outcome:
        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            cur = view.get(local_id)
            if cur is None or cur.sync_status != SYNCED or cur.server_id != server_id:
                return [], []  # changed locally meanwhile: a local change is never dropped
            self.purged_audio[local_id] = cur.audio_file or ""
            self.summary.deleted_locally += 1
            log.job_line("removed", local_id)
            return [], [local_id]

        return apply


Outcome = Callable[["_Overlay"], tuple[list[Job], list[str]]]


def _batchable(job: Job) -> bool:
    """Whether the job's push goes in a batch: it sends no audio, and it is no delete whose
    create may have reached the server without an answer (that one finds its copy first)."""
    if job.sync_status == PENDING_DELETION:
        return job.server_id is not None
    if job.server_id is None or job.error_kind == UNCONFIRMED:
        return not job.audio_file
    return changed_fields(job)[1] is None


def _batch_operation(job: Job) -> dict[str, Any] | None:
    """The job's push as one batch operation, or None when it must go alone."""
    if not _batchable(job):
        return None
    if job.sync_status == PENDING_DELETION:
        return {"op": "delete", "id": job.server_id}
    if job.server_id is None or job.error_kind == UNCONFIRMED:
        return {"op": "create", "local_id": job.local_id, "text": job.text, "metadata": job.metadata}
    return {"op": "update", "id": job.server_id, "fields": changed_fields(job)[0]}


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


_Batch = list[tuple[Job, tuple[str, bytes]]]  # jobs and their operations as JSON


class _IdFilter:
    """Server ids as a Bloom filter of fixed size (1 MiB; Bloom 1970): `may_hold` is False for
    an id never added, and rarely (a few in 100,000 at 100,000 ids) True for one not added."""

    BITS = 1 << 23

    def __init__(self) -> None:
        self._bits = bytearray(self.BITS >> 3)

    def add(self, key: str) -> None:
        h = hash(key)  # 64 bits of SipHash, cached on the string
        for shift in (0, 21, 42):
            position = (h >> shift) & (self.BITS - 1)
            self._bits[position >> 3] |= 1 << (position & 7)

    def may_hold(self, key: str) -> bool:
        h = hash(key)
        for shift in (0, 21, 42):
            position = (h >> shift) & (self.BITS - 1)
            if not self._bits[position >> 3] & (1 << (position & 7)):
                return False
        return True


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


class _StoreLookup:
    """A store not folded, read job by job (store.lookup): for a pull of a few changes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cache: dict[str, Job | None] = {}

    def get(self, local_id: str) -> Job | None:
        if local_id not in self.cache:
            self.cache[local_id] = self.store.lookup(local_id)
        return self.cache[local_id]

    def has_server_id(self, server_id: str) -> bool:
        return self.store.lookup_server_id(server_id) is not None


class _Overlay:
    """The store's jobs as changed by the outcomes applied so far in one flush."""

    def __init__(self, jobs: dict[str, Job], changed: dict[str, Job], purged: list[str]) -> None:
        self.jobs, self.changed, self.purged = jobs, changed, purged
        self._gone = set(purged)  # a batch of 500 deletes: no search of the list for each
        self._sids: set[str] | None = None

    def purge(self, local_id: str) -> None:
        self.purged.append(local_id)
        self._gone.add(local_id)

    def get(self, local_id: str) -> Job | None:
        if local_id in self.changed:
            return self.changed[local_id]
        if local_id in self._gone:
            return None
        return self.jobs.get(local_id)

    def has_server_id(self, server_id: str) -> bool:
        if isinstance(self.jobs, _StoreLookup):
            if self.jobs.has_server_id(server_id):
                return True
            return any(j.server_id == server_id for j in self.changed.values())
        if self._sids is None:
            self._sids = {j.server_id for j in self.jobs.values() if j.server_id is not None}
        if server_id in self._sids:
            return True
        return any(j.server_id == server_id for j in self.changed.values())


def _usable_id_in(exc: BaseException) -> str | None:
    """The valid server id an invalid job object in an answer carried (remote's
    InvalidJobObject.server_id), else None."""
    server_id = getattr(exc, "server_id", None)
    return server_id if isinstance(server_id, str) and server_id else None


def _differs(job: Job, sj: ServerJob) -> bool:
    return job.text != sj.text or job.metadata != sj.metadata or job.server_status != sj.status


def _without_cycle_collector(run: Callable[P, R]) -> Callable[P, R]:
    """Run without Python's cyclic garbage collector, which a pass of 100,000 jobs would keep
    waking to walk every job again as it replaces them (a third of a first sync's time). The
    pass frees what it makes by reference counting; the collector runs again afterwards."""

    @functools.wraps(run)
    def without(*args: P.args, **kwargs: P.kwargs) -> R:
        collecting = gc.isenabled()
        gc.disable()
        try:
            return run(*args, **kwargs)
        finally:
            if collecting:
                gc.enable()

    return without


@_without_cycle_collector
def run_pass(
    store: Store,
    remote: RemoteAPI,
    policy: Policy,
    now: Callable[[], _dt.datetime] = utc_now,
    rng: random.Random | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int], Any] | None = None,
    pull_state: dict[str, Any] | None = None,
    upload_progress: Callable[[int, int], Any] | None = None,
) -> PassSummary:
    """Run one pass. `pull_state` (what is known of the server: ETag, checkpoint, offers) is
    read and updated in place; `upload_progress(done, total)` sees each upload's bytes."""
    run = _Pass(
        store,
        remote,
        policy,
        now,
        rng or random.Random(),
        should_stop,
        progress,
        pull_state if pull_state is not None else {},
    )
    run.upload_progress = upload_progress
    # A store not folded yet in which no line names a status that needs a push: skip the push
    # and fold the store only if the listing changed. A no-change pass then reads no job at all.
    # A few due jobs in a store not folded (a create while the daemon idles): they are pushed
    # without folding 100,000 jobs; the pull then folds only if it must (listing mode).
    found = None if store.loaded else store.due_candidates(SPARSE_MAX_DUE)
    lazy = found == []
    candidates = None if lazy else found
    if candidates is not None and not _bound_once(store, candidates):
        candidates = None  # a store that breaks the one-binding invariant: fold (and repair)
    if candidates is not None:
        run.sparse = True
    begin_synced = None if (lazy or candidates is not None) else _synced_ids(store.refresh())
    try:
        if not lazy:
            run.push(candidates)
        if not run.should_stop():
            run.pull(begin_synced)
    except _StopPass as stop:
        run.flush()
        summary = run.summary
        summary.ok = False
        summary.skipped = stop.skipped
        summary.retry_after = stop.retry_after
        summary.message = str(stop)
        return summary
    summary = run.summary
    store.compact_if_worth_it()  # a pass that wrote many outcomes leaves many dead records
    if summary.errors or summary.failed:
        summary.ok = False
    if run.should_stop():
        summary.ok = False
    return summary


def _bound_once(store: Store, local_ids: list[str]) -> bool:
    for local_id in local_ids:
        job = store.lookup(local_id)
        if job is not None and job.server_id is not None and not store.bound_once(job.server_id):
            return False
    return True


def _synced_ids(jobs: dict[str, Job]) -> dict[str, str]:
    return {
        j.local_id: j.server_id for j in jobs.values() if j.sync_status == SYNCED and j.server_id
    }


def count_due(store: Store, now: _dt.datetime | None = None, policy: Policy | None = None) -> int:
    now = now or utc_now()
    max_wait = longest_backoff(policy) if policy is not None else None
    return sum(1 for j in store.refresh().values() if _is_due(j, now, max_wait))
