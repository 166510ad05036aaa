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
import hashlib
import random
import time
from collections.abc import Callable
from typing import Any

from . import audio, log
from .model import (
    Job,
    SyncStatus,
    backoff_delay,
    is_uuid,
    new_local_id,
    parse_rfc3339,
    rfc3339,
    utc_now,
)
from .remote import (
    AuthRefused,
    BackOff,
    Gone,
    InvalidJob,
    NotModified,
    Offline,
    Permanent,
    Remote,
    RemoteError,
    ServerJob,
    TLSFailure,
    Transient,
)
from .store import Store

PENDING = SyncStatus.PENDING.value
SYNCED = SyncStatus.SYNCED.value
PENDING_DELETION = SyncStatus.PENDING_DELETION.value
ERROR = SyncStatus.ERROR.value
FAILED = SyncStatus.FAILED.value

FLUSH_EVERY_JOBS = 200
FLUSH_EVERY_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Policy:
    max_retries: int = 5
    backoff_base_seconds: float = 15.0
    force_delete: bool = False


@dataclasses.dataclass
class PassSummary:
    ok: bool = True
    created: int = 0
    updated: int = 0
    deleted_remote: int = 0
    deleted_locally: int = 0
    pulled: int = 0
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
            "errors": self.errors,
            "failed": self.failed,
            "skipped": self.skipped,
            "deletion_guard": self.deletion_guard,
            "handed_to_daemon": self.handed_to_daemon,
        }


class _StopPass(Exception):
    def __init__(self, skipped: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.skipped = skipped
        self.retry_after = retry_after


def _stop_for(exc: RemoteError) -> _StopPass | None:
    """The errors that stop the whole pass (6.1, 6.2); None for per-job errors."""
    if isinstance(exc, Offline):
        return _StopPass("offline", str(exc))
    if isinstance(exc, TLSFailure):
        return _StopPass("tls", str(exc))
    if isinstance(exc, AuthRefused):
        return _StopPass("auth", str(exc))
    if isinstance(exc, BackOff):
        return _StopPass("backoff", str(exc), exc.retry_after)
    return None


def _is_due(job: Job, now: _dt.datetime) -> bool:
    status = job.sync_status
    if status == PENDING or (status == PENDING_DELETION and not job.next_attempt_at):
        return True
    if status in (ERROR, PENDING_DELETION):
        if not job.next_attempt_at:
            return True
        try:
            return parse_rfc3339(job.next_attempt_at) <= now
        except ValueError:
            return True
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
        remote: Remote,
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
        self.outcomes: list[Callable[[dict[str, Job]], tuple[list[Job], list[str]]]] = []
        self.last_flush = time.monotonic()

    # ---- writing outcomes ---------------------------------------------------------------------
    def _record(self, apply: Callable[[dict[str, Job]], tuple[list[Job], list[str]]]) -> None:
        self.outcomes.append(apply)
        if (
            len(self.outcomes) >= FLUSH_EVERY_JOBS
            or time.monotonic() - self.last_flush > FLUSH_EVERY_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.outcomes:
            return
        outcomes, self.outcomes = self.outcomes, []
        with self.store.locked():
            jobs = self.store.refresh()
            changed: dict[str, Job] = {}
            purged: list[str] = []
            view = _Overlay(jobs, changed, purged)
            for apply in outcomes:
                upd, gone = apply(view)
                for job in upd:
                    changed[job.local_id] = job
                for local_id in gone:
                    changed.pop(local_id, None)
                    purged.append(local_id)
            self.store.append(list(changed.values()), purged)
        # Audio files of purged jobs go after their records (a crash in between leaves an
        # orphan file, never a record pointing at a missing one).
        for local_id, path in list(self.purged_audio.items()):
            problem = audio.remove_managed(self.store.data_dir, path)
            if problem:
                log.warning(problem)
            del self.purged_audio[local_id]

    # ---- push ------------------------------------------------------------------------------------
    def push(self) -> None:
        now = self.now()
        jobs = self.store.refresh()
        due = [j for j in jobs.values() if _is_due(j, now)]
        due.sort(key=lambda j: (j.created_at, j.local_id))
        if not due:
            return
        try:
            for first in range(0, len(due), FLUSH_EVERY_JOBS):
                batch = [j.copy() for j in due[first : first + FLUSH_EVERY_JOBS]]
                self._mark_create_sent(batch)
                for done, snap in enumerate(batch, first + 1):
                    if self.should_stop():
                        return
                    self.push_one(snap)
                    if self.progress is not None:
                        self.progress(done)
        finally:
            self.flush()
            self._unmark_unsent()

    def _unmark_unsent(self) -> None:
        if not self.unsent:
            return
        with self.store.locked():
            current = self.store.refresh()
            unmarked = []
            for local_id in self.unsent:
                cur = current.get(local_id)
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
            current = self.store.refresh()
            marked = []
            for snap in to_mark:
                cur = current.get(snap.local_id)
                if cur is not None and not cur.create_sent:
                    cur = cur.copy()
                    cur.create_sent = True
                    marked.append(cur)
                    self.unsent.add(snap.local_id)
                snap.create_sent = True
            self.store.append(marked)

    def push_one(self, snap: Job) -> None:
        try:
            if snap.sync_status == PENDING_DELETION:
                self._push_delete(snap)
            elif snap.server_id is None:
                self._push_create(snap)
            else:
                self._push_update(snap)
        except RemoteError as exc:
            if not isinstance(exc, (Offline, TLSFailure, AuthRefused, BackOff, Permanent, Gone)):
                self.unsent.discard(snap.local_id)  # it may have been stored: keep create_sent
            stop = _stop_for(exc)
            if stop is not None:
                raise stop from None
            self._failure(snap, exc)

    def _push_create(self, snap: Job) -> None:
        sj = self.remote.create(snap.local_id, snap.text, snap.metadata, snap.audio_file)
        self.unsent.discard(snap.local_id)
        if sj.local_id is not None and sj.local_id.lower() != snap.local_id:
            raise Transient(
                f"POST /jobs: the server answered with another job ({sj.local_id[:64]!r})"
            )
        self.summary.created += 1
        audio_on_server = snap.audio_file
        if sj.audio is None:
            audio_on_server = None
        elif snap.audio_file and sj.audio.get("sha256") not in (
            None,
            _file_sha256(snap.audio_file),
        ):
            audio_on_server = None  # an earlier POST whose answer was lost carried other audio
        self._record(lambda view: self._apply_synced(view, snap, sj, audio_on_server, created=True))

    def _push_update(self, snap: Job) -> None:
        base = snap.base or {}
        fields: dict[str, Any] = {}
        if snap.text != base.get("text"):
            fields["text"] = snap.text
        if snap.metadata != base.get("metadata"):
            fields["metadata"] = snap.metadata
        send_audio = (
            snap.audio_file if snap.audio_file and snap.audio_file != snap.audio_sent else None
        )
        assert snap.server_id is not None
        sj = self.remote.update(snap.server_id, fields, send_audio)
        self.summary.updated += 1
        audio_on_server = (
            snap.audio_file
            if (send_audio or snap.audio_sent == snap.audio_file)
            else snap.audio_sent
        )
        self._record(
            lambda view: self._apply_synced(view, snap, sj, audio_on_server, created=False)
        )

    def _push_delete(self, snap: Job) -> None:
        server_id = snap.server_id
        if server_id is None and snap.create_sent:
            # Its create may have reached the server (answer lost): the idempotent POST finds
            # the server copy (or makes one) so that it can be deleted.
            # An empty body: the server answers a repeat with the stored job whatever we send.
            server_id = self.remote.create(snap.local_id, "", {}, None).id
        if server_id is not None:
            self.remote.delete(server_id)
            self.summary.deleted_remote += 1

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
        cur = cur.copy()
        stamp = rfc3339(self.now())
        cur.server_id = sj.id
        cur.create_sent = True
        cur.server_status = sj.status
        cur.base = {"text": sj.text, "metadata": sj.metadata}
        cur.audio_sent = audio_on_server
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
                cur.sync_status = SYNCED
                cur.retry_count = 0
                cur.last_error = None
                cur.error_kind = None
                cur.next_attempt_at = None
            else:
                # The server holds another version (an earlier POST whose answer was lost):
                # ours is newer, so it stays pending and the next pass PATCHes the difference.
                cur.sync_status = PENDING
                cur.retry_count = 0
                cur.next_attempt_at = None
                cur.error_kind = None
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

        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            cur = view.get(snap.local_id)
            if cur is None or cur.rev != snap.rev:
                return [], []  # edited meanwhile: the new version gets a fresh attempt
            cur = cur.copy()
            now = self.now()
            cur.last_sync_attempt_at = rfc3339(now)
            cur.last_error = message
            if deleting:
                cur.error_kind = "delete"
            elif gone:
                cur.error_kind = "gone"
            else:
                cur.error_kind = None
            if permanent:
                cur.sync_status = FAILED
                cur.next_attempt_at = None
                return [cur], []
            cur.retry_count += 1
            if cur.retry_count >= self.policy.max_retries:
                cur.sync_status = FAILED
                cur.next_attempt_at = None
                self.summary.errors -= 1
                self.summary.failed += 1
            else:
                cur.sync_status = PENDING_DELETION if deleting else ERROR
                delay = backoff_delay(self.policy.backoff_base_seconds, cur.retry_count, self.rng)
                cur.next_attempt_at = rfc3339(now + _dt.timedelta(seconds=delay))
            return [cur], []

        self._record(apply)

    # ---- pull ------------------------------------------------------------------------------------
    def pull(self, begin_synced: dict[str, str] | None) -> None:
        etag = self.pull_state.get("etag")
        # server_id -> local_id of the jobs synced when the pass began and not listed (yet):
        # shrinks page by page, rather than a set of every listed id growing to the whole listing.
        unlisted: dict[str, str] = {}
        self._added: set[str] = set()  # server-made jobs added in this pull (a page may repeat)
        new_etag: str | None = None
        complete = False
        invalid_seen = False
        self._index: dict[str, str] | None = None
        try:
            for page, listing_etag in self.remote.list_pages(etag):
                if self._index is None:  # the listing changed: now the store is needed
                    jobs = self.store.refresh()
                    if begin_synced is None:
                        begin_synced = _synced_ids(jobs)
                    unlisted = {sid: lid for lid, sid in begin_synced.items()}
                    self._index = {
                        j.server_id: j.local_id for j in jobs.values() if j.server_id is not None
                    }
                new_etag = listing_etag
                # Minimal handling of invalid job objects (contract 6.4) from wt-http; the lead
                # reconciles: skipped with a warning, the pass not ok, nothing removed in it.
                invalid = [j for j in page if isinstance(j, InvalidJob)]
                for bad in invalid:
                    log.warning(f"skipped an invalid job {bad.id or '(no id)'}: {bad.reason}")
                    self.summary.ok = False
                    invalid_seen = True
                self._apply_page([j for j in page if not isinstance(j, InvalidJob)], unlisted)
                if self.should_stop():  # also the daemon's proof of progress for its watchdog
                    break
            else:
                complete = not invalid_seen
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
            missing = {lid: sid for sid, lid in unlisted.items()}
            del unlisted
            settled = complete and self._detect_server_deletions(begin_synced or {}, missing)
        finally:
            self.flush()
        if settled and new_etag:
            self.pull_state["etag"] = new_etag
        else:
            self.pull_state.pop("etag", None)

    def _apply_page(self, page: list[ServerJob], unlisted: dict[str, str]) -> None:
        jobs = self.store.refresh()
        by_server_id = self._index or {}
        for sj in page:
            unlisted.pop(sj.id, None)
            local_id = by_server_id.get(sj.id)
            if local_id is not None:
                cur = jobs.get(local_id)
                if cur is not None and cur.sync_status == SYNCED and _differs(cur, sj):
                    self._record(self._take_server_copy(local_id, cur.rev, sj))
                continue
            if sj.local_id is not None and sj.local_id.lower() in jobs:
                mine = jobs[sj.local_id.lower()]
                if mine.server_id is None:
                    continue  # our own create whose answer was lost: the push links it
            if sj.id in self._added:
                continue
            self._added.add(sj.id)
            self._record(self._add_from_server(sj))

    def _take_server_copy(self, local_id: str, rev: int, sj: ServerJob):
        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            cur = view.get(local_id)
            if cur is None or cur.sync_status != SYNCED or cur.rev != rev or not _differs(cur, sj):
                return [], []
            cur = cur.copy()
            cur.text, cur.metadata, cur.server_status = sj.text, sj.metadata, sj.status
            cur.base = {"text": sj.text, "metadata": sj.metadata}
            cur.updated_at = sj.updated_at or rfc3339(self.now())
            self.summary.pulled += 1
            return [cur], []

        return apply

    def _add_from_server(self, sj: ServerJob):
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
        if (
            len(begin_synced) >= 2
            and len(missing) == len(begin_synced)
            and not self.policy.force_delete
        ):
            self.summary.deletion_guard = True
            self.summary.ok = False
            self.summary.message = (
                f"the server listing holds none of the {len(begin_synced)} synced jobs; nothing was "
                "removed. Run `jobsyncd sync --force-delete` if the server really was emptied"
            )
            log.warning(self.summary.message)
            self.summary.message_logged = True
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

    def _take_server_copy_any_rev(self, local_id: str, sj: ServerJob):
        jobs = self.store.jobs
        cur = jobs.get(local_id)
        return self._take_server_copy(local_id, cur.rev if cur else -1, sj)

    def _purge_deleted_on_server(self, local_id: str, server_id: str):
        def apply(view: _Overlay) -> tuple[list[Job], list[str]]:
            cur = view.get(local_id)
            if cur is None or cur.sync_status != SYNCED or cur.server_id != server_id:
                return [], []  # changed locally meanwhile: a local change is never dropped
            self.purged_audio[local_id] = cur.audio_file or ""
            self.summary.deleted_locally += 1
            return [], [local_id]

        return apply


class _Overlay:
    """The store's jobs as changed by the outcomes applied so far in one flush."""

    def __init__(self, jobs: dict[str, Job], changed: dict[str, Job], purged: list[str]) -> None:
        self.jobs, self.changed, self.purged = jobs, changed, purged
        self._sids: set[str] | None = None

    def get(self, local_id: str) -> Job | None:
        if local_id in self.changed:
            return self.changed[local_id]
        if local_id in self.purged:
            return None
        return self.jobs.get(local_id)

    def has_server_id(self, server_id: str) -> bool:
        if self._sids is None:
            self._sids = {j.server_id for j in self.jobs.values() if j.server_id is not None}
        if server_id in self._sids:
            return True
        return any(j.server_id == server_id for j in self.changed.values())


def _differs(job: Job, sj: ServerJob) -> bool:
    return job.text != sj.text or job.metadata != sj.metadata or job.server_status != sj.status


def run_pass(
    store: Store,
    remote: Remote,
    policy: Policy,
    now: Callable[[], _dt.datetime] = utc_now,
    rng: random.Random | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int], Any] | None = None,
    pull_state: dict[str, Any] | None = None,
) -> PassSummary:
    """Run one pass. `pull_state` (the listing's ETag) is read and updated in place."""
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
    # A store not folded yet in which no line names a status that needs a push: skip the push
    # and fold the store only if the listing changed. A no-change pass then reads no job at all.
    lazy = not store.loaded and not store.may_hold_due_jobs()
    begin_synced = None if lazy else _synced_ids(store.refresh())
    try:
        if not lazy:
            run.push()
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


def _synced_ids(jobs: dict[str, Job]) -> dict[str, str]:
    return {
        j.local_id: j.server_id for j in jobs.values() if j.sync_status == SYNCED and j.server_id
    }


def count_due(store: Store, now: _dt.datetime | None = None) -> int:
    now = now or utc_now()
    return sum(1 for j in store.refresh().values() if _is_due(j, now))
