"""The pull: the server's changes into the store, from the change feed when the server offers
it (6.7), else from the whole listing (6.4); matching server jobs to local ones (by local_id
first, then server_id), rebinds after a restore, and deletions on the server (a tombstone, or a
synced job a complete listing lacks and a GET confirms gone), behind the deletion guard.

Decides and talks; what it learns goes to the journal as outcomes (journal.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .. import log
from ..api import (
    AnswerTooLarge,
    FeedGone,
    FeedNotOffered,
    FeedPage,
    Gone,
    HeldTest,
    NotAFeed,
    NotModified,
    RemoteError,
    ServerJob,
    Tombstone,
    Unchanged,
)
from ..jobtable import JobTable, LazyDict
from ..lifecycle import SYNCED
from ..model import Job
from .journal import PassContext, _StoreLookup
from .outcomes import (
    AddedFromServer,
    BackToPending,
    Rebound,
    RemovedByServer,
    ServerCopyTaken,
)
from .rules import differs, file_sha256, raise_if_stops, worth_asking

FEED_PAGE_LIMIT = 1000  # a first sync reads its own creates back: fewer pages, fewer writes
SPARSE_MAX_CHANGES = 64  # a feed read this small is applied without folding the store
FEED_MAX_STALLS = 3  # pages in a row with `more` but no change: a feed that loops is cut off


class Puller:
    def __init__(self, ctx: PassContext) -> None:
        self.store, self.remote, self.policy = ctx.store, ctx.remote, ctx.policy
        self.journal, self.summary = ctx.journal, ctx.summary
        self.should_stop, self.pull_state = ctx.should_stop, ctx.pull_state
        self._record, self.flush = ctx.journal.record, ctx.journal.flush
        self._added: set[str]  # server-made jobs added in this pull (a page may repeat)
        self._invalid_seen: bool  # an invalid job object was skipped: nothing is removed
        # server_id -> (local job, old server id, server job): listed under a local job's
        # local_id while that job is bound to another server id
        self._rebinds: dict[str, tuple[Job, str, ServerJob]]
        self._index: Mapping[str, str] | None  # server_id -> local_id, once the store is folded
        self._forget()

    def pull(self, begin_synced: Mapping[str, str] | None) -> None:
        """The change feed when the server offers it (6.7), else the whole listing (6.4)."""
        if hasattr(self.remote, "changes") and worth_asking(self.pull_state, "feed", time.time()):
            try:
                self.pull_feed(begin_synced)
                return
            except FeedNotOffered:
                self.pull_state["feed"] = {"offered": False, "checked_at": time.time()}
                self.pull_state.pop("checkpoint", None)
                log.info("the server offers no change feed: listing mode (asked again in a day)")
        self.pull_listing(begin_synced)

    def _forget(self) -> None:
        self._added, self._invalid_seen, self._rebinds, self._index = set(), False, {}, None

    def _start_pull(self) -> None:
        self._forget()
        self.journal.sparse = False

    def _index_store(self, begin_synced: Mapping[str, str] | None) -> Mapping[str, str]:
        """Fold the store (the server had something to say) and index it by server_id."""
        jobs = self.store.refresh()
        if begin_synced is None:
            begin_synced = synced_ids(jobs)
        if jobs.raw_count:  # a lazy fold: built if used (a read-back of our own pushes never is)
            snapshot = jobs.snapshot()
            self._index = LazyDict(
                lambda: {sid: lid for lid, sid, _ in snapshot.summaries() if sid is not None}
            )
        else:
            self._index = {sid: lid for lid, sid, _ in jobs.summaries() if sid is not None}
        return begin_synced

    # ---- the change feed (6.7) -------------------------------------------------------------------
    def pull_feed(self, begin_synced: Mapping[str, str] | None) -> None:
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
        self, since: str | None, begin_synced: Mapping[str, str] | None, resync: str | None
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
                    page = self._read_page(since, limit)
                except AnswerTooLarge:
                    if limit == 1:
                        raise
                    limit = max(1, limit // 4)  # big jobs: fewer per page, never stuck
                    continue
                pages += 1
                # A resync needs the store even when the feed is empty (a restore to a backup
                # older than every job): each job synced here and not in the feed is settled.
                if (page.items or resync) and self._index is None and not self.journal.sparse:
                    if (
                        not resync
                        and not self.store.loaded
                        and not page.more
                        and len(page.items) <= SPARSE_MAX_CHANGES
                    ):
                        self.journal.sparse = True
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
                    self._apply_feed_page(live, unlisted)
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
            if isinstance(exc, RemoteError):
                raise_if_stops(exc)
            self._failed_part_way(
                f"the change feed failed part-way: {exc}",
                "it is read again from the last checkpoint",
            )
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
        synced = begin_synced if begin_synced is not None else {}
        settled = self._settle_feed(synced, tombstones, unlisted, resync, complete)
        if settled and self.pull_state.get("checkpoint") != since:
            # Written only when it moves: a no-change pass leaves pull_state.json unwritten.
            self.pull_state["checkpoint"] = since
            self.pull_state["checkpoint_at"] = time.time()

    def _read_page(self, since: str | None, limit: int) -> FeedPage:
        """One page of the feed, asked for once what the pages before made of their jobs is
        written: a job changed again while the feed is read comes once more on a later page,
        and is compared with what the earlier page made of it, not with the job as the read
        began."""
        self.flush()
        return self.remote.changes(since, limit, 0, self._held_test())

    def _apply_feed_page(self, live: list[Any], unlisted: dict[str, str]) -> None:
        """A page applied against the store as it was when the page was asked for (as its held
        test saw it): its outcomes are written together, before the next page is asked for."""
        self.journal.holding = True
        try:
            self._apply_page(live, unlisted)
        finally:
            self.journal.holding = False

    def _held_test(self) -> HeldTest | None:
        """For the feed: whether a job object names a job held here bound to its id with its
        text, metadata and status, to which applying it would change nothing (a first sync
        reads back every job it pushed). None before the store is folded (sparse passes)."""
        if self.journal.sparse or not self.store.loaded:
            return None
        jobs = self.store.refresh()

        def held(obj: dict[str, Any]) -> bool:
            local_id = obj.get("local_id")
            mine = jobs.get(local_id) if type(local_id) is str else None
            return (
                mine is not None
                and mine.server_id is not None
                and mine.server_id == obj.get("id")
                and mine.text == obj.get("text")
                and mine.server_status == obj.get("status")
                and mine.metadata == obj.get("metadata")
            )

        return held

    def _settle_feed(
        self,
        begin_synced: Mapping[str, str],
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
        self, begin_synced: Mapping[str, str], tombstones: dict[str, str | None]
    ) -> bool:
        """Remove the synced jobs bound to tombstoned ids; False when the deletion guard trips."""
        doomed = {}
        for sid in tombstones:
            local_id = self._bound_local_id(sid)
            if local_id is not None:
                doomed[local_id] = sid
        if self.journal.sparse:
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
            self._record(RemovedByServer(local_id, server_id))
        return True

    # ---- the listing (6.4) -----------------------------------------------------------------------
    def pull_listing(self, begin_synced: Mapping[str, str] | None) -> None:
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
            raise_if_stops(exc)
            self._failed_part_way(
                f"the server listing failed part-way: {exc}", "no job is removed in this pass"
            )
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
                and self._detect_server_deletions(
                    begin_synced if begin_synced is not None else {}, missing
                )
            )
        finally:
            self.flush()
        if settled and new_etag:
            self.pull_state["etag"] = new_etag
        else:
            self.pull_state.pop("etag", None)

    # ---- matching ----------------------------------------------------------------------------
    def _apply_page(self, page: list[Any], unlisted: dict[str, str]) -> None:
        """Match each server job to a local job by `local_id` first, then by `server_id` (6.4):
        a job deleted and created again on the server under the same local_id is the same job,
        rebound to its new server id, never a second local job."""
        jobs: Any = _StoreLookup(self.store) if self.journal.sparse else self.store.refresh()
        for sj in page:
            if type(sj) is Unchanged:  # the job bound to this id, as held: nothing to apply
                unlisted.pop(sj.id, None)
                continue
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
                self._rebinds[sj.id] = (mine, mine.server_id, sj)
                unlisted.pop(mine.server_id, None)
                continue
            # Usually the job found by local_id is the one bound to this id: no second look-up.
            local_id = mine.local_id if mine is not None else self._bound_local_id(sj.id)
            if local_id is not None:
                cur = mine if mine is not None else jobs.get(local_id)
                if cur is not None and cur.sync_status == SYNCED and differs(cur, sj):
                    self._record(ServerCopyTaken(local_id, cur.rev, sj))
                continue
            if sj.id in self._added:
                continue
            self._added.add(sj.id)
            self._record(AddedFromServer(sj))

    def _settle_rebinds(self, tombstoned: frozenset[str] | set[str] = frozenset()) -> None:
        """A server job listed under a local job's local_id while that job is bound to another
        server id: if the old copy is gone (GET 404), the server deleted and re-created the job
        (a restore) and the local job is rebound to it (6.4); if the old copy is still there,
        the listed one is another job that happens to carry our local_id, added as new."""
        for new_id, (mine, old_id, sj) in self._rebinds.items():
            if self.should_stop():
                return
            if old_id in tombstoned:  # the feed said the old copy is gone: no GET needed
                self._record(_rebound(mine, old_id, sj))
                continue
            try:
                self.remote.get(old_id)
            except Gone:
                self._record(_rebound(mine, old_id, sj))
                continue
            except RemoteError as exc:
                raise_if_stops(exc)
                self.summary.ok = False
                log.warning(f"job {mine.local_id}: could not check its server copy: {exc}")
                continue
            if new_id not in self._added:
                self._added.add(new_id)
                self._record(AddedFromServer(sj))

    def _bound_local_id(self, server_id: str) -> str | None:
        """The local job bound to `server_id` as the pull began (sparse: as the file says)."""
        if self.journal.sparse:
            job = self.store.lookup_server_id(server_id)
            return job.local_id if job is not None else None
        return self._index.get(server_id) if self._index is not None else None

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

    # ---- deletions on the server -------------------------------------------------------------
    def _detect_server_deletions(
        self, begin_synced: Mapping[str, str], missing: dict[str, str]
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
                self._record(RemovedByServer(local_id, server_id))
                continue
            except RemoteError as exc:
                raise_if_stops(exc)
                self.summary.ok = False
                settled = False
                log.warning(f"job {local_id}: could not confirm it on the server: {exc}")
                continue
            if sj.id == server_id:
                cur = self.store.lookup(local_id) if self.journal.sparse else self.store.jobs.get(local_id)
                self._record(ServerCopyTaken(local_id, cur.rev if cur else -1, sj))
            settled = False  # the listing and the job disagree: list again next time
        return settled

    def _failed_part_way(self, message: str, consequence: str) -> None:
        """The pull could not finish: the pass is not ok, and says why (once)."""
        self.summary.ok = False
        self.summary.message = message
        log.warning(f"{message}; {consequence}")
        self.summary.message_logged = True

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
            self._record(BackToPending(local_id, server_id))
        self.flush()
        if self.summary.reuploaded:
            log.warning(
                f"{self.summary.reuploaded} synced jobs the server no longer has went back to "
                "pending; the next pass creates them again"
            )


def _rebound(mine: Job, old_id: str, sj: ServerJob) -> Rebound:
    """The rebind outcome, with the hash of the job's audio taken now (apply reads no file)."""
    path = mine.audio_file
    return Rebound(mine.local_id, old_id, sj, path, file_sha256(path) if path and sj.audio else None)


def synced_ids(jobs: JobTable) -> Mapping[str, str]:
    """local_id -> server_id of the synced jobs (what the last sync recorded), as they are now,
    worked out when first read (a pass that removes nothing never reads it)."""
    snapshot = jobs.snapshot()
    return LazyDict(
        lambda: {lid: sid for lid, sid, status in snapshot.summaries() if status == SYNCED and sid}
    )
