"""The pass's writes: outcomes batched into few fsynced appends, create_sent marks, audio
removal, and which server ids the pass has bound.

The pass never holds the store lock while it talks to the server. What it learns is recorded
here as outcomes (outcomes.py) and written in batches (every FLUSH_EVERY_JOBS outcomes or
FLUSH_EVERY_SECONDS), each applied under the lock to the job's current record through an
overlay of the outcomes applied before it in the same write. Before a create may reach the
server the job is marked `create_sent`, durably (6.3): a delete that comes while the create is in
flight, or after its answer was lost, then knows to find the server copy; the marks of creates
never sent are taken back at the end of the push.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import random
import time
from collections.abc import Callable
from typing import Any

from .. import audio, log
from ..api import RemoteAPI
from ..jobtable import JobTable
from ..lifecycle import PENDING_DELETION
from ..model import Job
from ..store import Store
from .outcomes import Applied, Outcome, apply
from .rules import PassSummary, Policy

FLUSH_EVERY_JOBS = 200
FLUSH_EVERY_SECONDS = 1.0


@dataclasses.dataclass
class PassContext:
    """What the push and the pull of one pass share."""

    store: Store
    remote: RemoteAPI
    policy: Policy
    journal: Journal
    summary: PassSummary
    should_stop: Callable[[], bool]
    pull_state: dict[str, Any]  # what is known of the server: ETag, checkpoint, offers


class Journal:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        summary: PassSummary,
        now: Callable[[], _dt.datetime],
        rng: random.Random,
    ) -> None:
        self.store = store
        self.policy = policy
        self.summary = summary
        self.now = now
        self.rng = rng
        self.outcomes: list[Outcome] = []
        self.last_flush = time.monotonic()
        # Handling a batch's answers: its outcomes are written with the next batch's marks.
        self.holding = False
        # A pull of a few changes, or a push of a few jobs, into a store not folded: jobs are
        # looked up one by one in the file (a few ms each) instead of folding 100,000 of them.
        self.sparse = False
        self.purged_audio: dict[str, str] = {}  # audio copies to remove once their records are gone
        # Marked create_sent by this pass but not POSTed, or surely not stored: unmarked at the
        # end, so that a delete of a job that never reached the server just drops it.
        self.unsent: set[str] = set()
        self._holders: dict[str, str] = {}  # sparse: server_id -> local_id bound in this pass
        self._bound: _IdFilter | None = None  # folded store: the server ids bound, built when needed
        self._unwritten: dict[str, str] = {}  # folded store: bindings of outcomes not yet written

    # ---- outcomes ------------------------------------------------------------------------------
    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if not self.holding and (
            len(self.outcomes) >= FLUSH_EVERY_JOBS
            or time.monotonic() - self.last_flush > FLUSH_EVERY_SECONDS
        ):
            self.flush()

    def flush(self, marks: list[Job] | None = None) -> None:
        """Write the outcomes recorded so far, and (`marks`) that the creates among those jobs
        may reach the server (create_sent), as one fsynced write: a batch's marks go with the
        outcomes of the batch before it."""
        self.last_flush = time.monotonic()
        to_mark = [j for j in marks or () if _needs_mark(j)]
        if not self.outcomes and not to_mark:
            return
        outcomes, self.outcomes = self.outcomes, []
        now = self.now()  # one time per write, not per job
        with self.store.locked():
            jobs: Any = _StoreLookup(self.store) if self.sparse else self.store.refresh()
            changed: dict[str, Job] = {}
            view = _Overlay(jobs, changed, [])
            for outcome in outcomes:
                self._take(apply(view, outcome, self.policy, now, self.rng), view)
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
            self.store.append(list(changed.values()), view.purged, compact=False, adopt=True)
            self._unwritten.clear()  # bound in the store now (or not at all: the job went)
        # Audio files of purged jobs go after their records (a crash in between leaves an
        # orphan file, never a record pointing at a missing one).
        for local_id, path in list(self.purged_audio.items()):
            problem = audio.remove_managed(self.store.data_dir, path)
            if problem:
                log.warning(problem)
            del self.purged_audio[local_id]

    def _take(self, applied: Applied, view: _Overlay) -> None:
        if applied.job is not None:
            view.changed[applied.job.local_id] = applied.job
        if applied.purged is not None:
            view.changed.pop(applied.purged, None)
            view.purge(applied.purged)
            if applied.audio_to_remove is not None:
                self.purged_audio[applied.purged] = applied.audio_to_remove
        for name, amount in applied.counts:
            setattr(self.summary, name, getattr(self.summary, name) + amount)
        if applied.again:
            self.summary.again = True
        if applied.line is not None:
            verb, local_id, detail = applied.line
            log.job_line(verb, local_id, detail)

    # ---- create_sent -------------------------------------------------------------------------
    def mark_create_sent(self, batch: list[Job]) -> None:
        """Before any POST, record durably (one write per batch) that it may reach the server:
        a delete that comes while a create is in flight, or after its answer was lost, then
        knows to find the server copy."""
        to_mark = [j for j in batch if _needs_mark(j)]
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

    def unmark_unsent(self) -> None:
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

    # ---- bindings ----------------------------------------------------------------------------
    def holder_of(self, server_id: str) -> str | None:
        """The local job bound to `server_id` (the store as read, plus this pass's bindings)."""
        if self.sparse:
            if server_id in self._holders:
                return self._holders[server_id]
            job = self.store.lookup_server_id(server_id)
            return job.local_id if job is not None else None
        if server_id in self._unwritten:
            return self._unwritten[server_id]
        if self._bound is None:
            # A Bloom filter of the ids bound, not a dict of them: 1 MiB, not 5 at 100,000 jobs.
            self._bound = _IdFilter()
            for _, sid, _ in self.store.refresh().summaries():
                if sid is not None:
                    self._bound.add(sid)
        if not self._bound.may_hold(server_id):
            return None
        return next(
            (lid for lid, sid, _ in self.store.refresh().summaries() if sid == server_id), None
        )

    def bind(self, server_id: str, local_id: str) -> None:
        """Note that this pass binds `server_id` to `local_id` (written with its outcome)."""
        if self.sparse:
            self._holders[server_id] = local_id
            return
        self._unwritten[server_id] = local_id
        if self._bound is not None:
            self._bound.add(server_id)

    def forget_bound(self) -> None:
        """The push is over: the pull has its own index, not both in memory at once."""
        self._bound = None


def _needs_mark(job: Job) -> bool:
    return job.server_id is None and not job.create_sent and job.sync_status != PENDING_DELETION


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
    """The store's jobs as changed by the outcomes applied so far in one write."""

    def __init__(
        self, jobs: JobTable | _StoreLookup, changed: dict[str, Job], purged: list[str]
    ) -> None:
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
            self._sids = {sid for _, sid, _ in self.jobs.summaries() if sid is not None}
        if server_id in self._sids:
            return True
        return any(j.server_id == server_id for j in self.changed.values())
