"""A hypothesis state machine for the sync pass (contract section 6), in process.

Random local creates, edits, deletes and retries, server-side creates, edits and deletes, injected
server failures and sync passes run against a server, with the contract's promises checked after
every step:

- the server never holds two jobs with the same `local_id`;
- a job the agent knows is never lost, unless the user deleted it or the server deleted a job that
  was `synced` when the pass began;
- a pass never overwrites a local change (a field of a job not `synced` when the pass began that
  differs from what the server held at the last sync);
- after a clean sync (no faults, two passes) every local job that is not `failed` is `synced` and
  matches its server copy, every server job is known here, and every job deleted here is gone
  from the server.

The machine runs in listing mode, and in feed mode (the server's change feed on), with backups
and restores of the server (with `new-history`) among its steps. In feed mode a restore never
costs a job: only a job the server deleted (a tombstone) may vanish from a synced agent.

Each mode runs against two servers, behind one `ServerSide` (the other clients, the faults, the
admin's backups, and what the server holds): "http", the FaultServer (tests/support/
faultserver.py) over real HTTP through `remote.Remote`; "memory", the MemoryServer with the
reference server's semantics through `MemoryRemote` (tests/support/memory_remote.py), whose
faults raise what `remote.Remote` makes of the FaultServer's. Every fault of FAULTS has its
in-memory equivalent, so no rule is left out in memory. Neither server offers batches here.

CI runs a bounded number of examples: over HTTP 25 of 15 steps per mode, in memory (about 30 ms
an example) 200 of 30 steps; set JOBSYNCD_HYPOTHESIS_EXAMPLES for a longer, random search of
every mode. The first 200-example search in memory found three broken promises, each now a test
of its own in tests/test_sync_findings.py and tests/server/test_changes.py: a diverged resync
whose feed is empty re-uploaded nothing; a DELETE answered 200 with a body that is not JSON (a
captive portal) was taken as done; after a restore the reference server's ETags repeated.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import uuid
from typing import Any, Protocol

import pytest
from faultserver import API_PREFIX, FaultServer
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from memory_remote import MemoryRemote, MemoryServer

from jobsyncd.api import RemoteAPI, RemoteError
from jobsyncd.jobs import create_job, delete_job, retry_job, update_job
from jobsyncd.remote import Remote
from jobsyncd.store import Store
from jobsyncd.sync import Policy, run_pass

pytestmark = pytest.mark.timeout(300)

SEARCH = os.environ.get("JOBSYNCD_HYPOTHESIS_EXAMPLES")
# (examples, steps) by server side; one figure for every side in a longer search.
BUDGET = {
    "http": (int(SEARCH), 30) if SEARCH else (25, 15),
    "memory": (int(SEARCH), 30) if SEARCH else (200, 30),
}
POLICY = Policy(max_retries=3, backoff_base_seconds=0)

# Paths under the API, as both servers' faults take them.
JOBS = r"/jobs"
ONE_JOB = r"/jobs/.+"

texts = st.sampled_from(["", "a", "hello", "zürich ✓", "line\nbreak", "x" * 50])
metas = st.dictionaries(
    st.sampled_from(["k", "n", "who"]),
    st.one_of(st.integers(-3, 3), st.sampled_from(["v", "", "ü"]), st.booleans(), st.none()),
    max_size=3,
)
picks = st.integers(min_value=0, max_value=10**6)

# (method, path) a fault may hit, and the faults themselves.
TARGETS = [
    ("POST", JOBS),
    ("PATCH", ONE_JOB),
    ("DELETE", ONE_JOB),
    ("GET", JOBS),
    ("GET", ONE_JOB),
]
FAULTS = [
    {"status": 500},
    {"status": 422},
    {"status": 503, "headers": {"Retry-After": "1"}},
    {"status": 429, "headers": {"Retry-After": "1"}},
    {"drop_after_store": True},
    {"drop_before": True},
    {"garbage": True},
    {"content_type": "text/html"},
    {"huge": 8 << 20},
]


def silent(message: str) -> None:
    pass


# ---- the server side: what the machine does to the server, and reads of it ---------------------


class ServerSide(Protocol):
    remote: RemoteAPI  # the agent's client of this server

    def jobs(self) -> dict[str, dict[str, Any]]: ...

    def create(self, local_id: str | None, text: str | None, metadata: dict[str, Any]) -> None:
        """Another client's job; `local_id` None: a fresh UUID."""

    def edit(self, job_id: str, **fields: Any) -> None: ...

    def delete(self, job_id: str) -> None: ...

    def add_fault(self, method: str, path: str, times: int, **action: Any) -> None: ...

    def clear_faults(self) -> None: ...

    def backup(self) -> Any: ...

    def restore(self, state: Any) -> None:
        """Back to `state`, with `new-history` as the documented restore procedure says."""

    def local_ids_of(self, state: Any) -> set[str]: ...

    def close(self) -> None: ...


class HTTPSide:
    """The FaultServer on 127.0.0.1, the agent's `remote.Remote` talking HTTP to it."""

    def __init__(self, feed: bool) -> None:
        self.srv = FaultServer()
        self.srv.feed = feed
        self.remote = Remote(self.srv.url + API_PREFIX, timeout=2)

    def jobs(self) -> dict[str, dict[str, Any]]:
        return self.srv.jobs

    def create(self, local_id: str | None, text: str | None, metadata: dict[str, Any]) -> None:
        self.srv.server_create(local_id=local_id, text=text, metadata=metadata)

    def edit(self, job_id: str, **fields: Any) -> None:
        self.srv.server_edit(job_id, **fields)

    def delete(self, job_id: str) -> None:
        self.srv.server_delete(job_id)

    def add_fault(self, method: str, path: str, times: int, **action: Any) -> None:
        self.srv.add_fault(method, API_PREFIX + path, times=times, **action)

    def clear_faults(self) -> None:
        self.srv.clear_faults()

    def backup(self) -> Any:
        return self.srv.backup()

    def restore(self, state: Any) -> None:
        self.srv.restore(state, new_history=True)

    def local_ids_of(self, state: Any) -> set[str]:
        return {j["local_id"] for j in state["jobs"].values()}

    def close(self) -> None:
        try:
            self.remote.close()
        finally:
            self.srv.close()


class MemorySide:
    """The MemoryServer, the reference server's semantics in memory, through a MemoryRemote."""

    def __init__(self, feed: bool) -> None:
        self.server = MemoryServer(offers_feed=feed, offers_batch=False)
        self.remote = MemoryRemote(self.server)

    def jobs(self) -> dict[str, dict[str, Any]]:
        return self.server.jobs()

    def create(self, local_id: str | None, text: str | None, metadata: dict[str, Any]) -> None:
        if local_id is None:
            self.server.create(str(uuid.uuid4()), text, metadata)
        else:  # not a UUID: the API refuses it; another server version may hold one
            self.server.plant(local_id, text, metadata)

    def edit(self, job_id: str, **fields: Any) -> None:
        self.server.update(job_id, fields)

    def delete(self, job_id: str) -> None:
        self.server.delete(job_id)

    def add_fault(self, method: str, path: str, times: int, **action: Any) -> None:
        self.remote.add_fault(method, path, times=times, **action)

    def clear_faults(self) -> None:
        self.remote.clear_faults()

    def backup(self) -> Any:
        return self.server.backup()

    def restore(self, state: Any) -> None:
        self.server.restore(state, new_history=True)

    def local_ids_of(self, state: Any) -> set[str]:
        return self.server.local_ids_of(state)

    def close(self) -> None:
        self.remote.close()


SIDES = {"http": HTTPSide, "memory": MemorySide}


# ---- the machine -------------------------------------------------------------------------------


class SyncMachine(RuleBasedStateMachine):
    feed = False
    side_kind = "http"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="jobsyncd-model-")
        os.chmod(self.dir, 0o700)
        self.store = Store(self.dir, warn=silent)
        self.srv: ServerSide = SIDES[self.side_kind](self.feed)
        self.backups: list[Any] = []
        self.deleted_on_server: set[str] = set()  # server ids deleted by a server-side client
        self.remote = self.srv.remote
        self.rng = random.Random(0)
        self.pull_state: dict = {}
        # local_ids the agent must still hold (created here or pulled, not deleted here).
        self.must_keep: set[str] = set()
        # local_ids the user deleted here (they may linger as failed deletions).
        self.deleted_here: set[str] = set()
        self.faults_armed = False
        self.foreign = 0

    def teardown(self) -> None:
        try:
            self.srv.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers ---------------------------------------------------------------------------------

    def local(self) -> dict:
        return {lid: job.copy() for lid, job in self.store.load().items()}

    @staticmethod
    def choose(items, pick):
        items = sorted(items)
        return items[pick % len(items)] if items else None

    def sync_once(self, policy: Policy = POLICY):
        before = self.local()
        server_before = self.srv.jobs()
        may_vanish = {
            lid
            for lid, job in before.items()
            if job.sync_status == "synced"
            and job.server_id not in server_before
            # On the feed only a deletion (a tombstone) removes a job; a restore never does.
            and (not self.feed or job.server_id in self.deleted_on_server)
        }
        summary = run_pass(
            self.store, self.remote, policy, rng=self.rng, pull_state=self.pull_state
        )
        after = self.local()
        for lid, job in before.items():
            if job.sync_status == "synced" or lid not in after:
                continue
            # A field changed here since the last sync (it differs from what the server held
            # then) is a local change: the pass never overwrites it. A field left alone here may
            # take another client's edit (server wins), field by field.
            base = job.base or {}
            for field in ("text", "metadata"):
                local_change = job.base is None or getattr(job, field) != base.get(field)
                if local_change:
                    assert getattr(after[lid], field) == getattr(job, field), (
                        f"the pass overwrote the local {field} of job {lid} "
                        f"({job.sync_status}): {getattr(job, field)!r} -> "
                        f"{getattr(after[lid], field)!r}"
                    )
        for lid in self.must_keep - set(after):
            assert lid in may_vanish, (
                f"job {lid} ({before[lid].sync_status if lid in before else '?'}) was lost by a "
                f"pass: {summary!r}"
            )
            if summary.deletion_guard:
                raise AssertionError(f"job {lid} was removed although the deletion guard tripped")
        self.must_keep &= set(after)
        # Jobs pulled from the server are ours to keep from now on.
        self.must_keep |= {
            lid for lid, j in after.items() if j.sync_status != "pending_deletion"
        } - self.deleted_here
        return summary

    # ---- local rules -------------------------------------------------------------------------------

    @rule(text=texts, metadata=metas)
    def create(self, text, metadata):
        job = create_job(self.store, text, None, metadata)
        self.must_keep.add(job.local_id)

    @rule(pick=picks, text=st.one_of(st.none(), texts), metadata=metas, unset=st.booleans())
    def update(self, pick, text, metadata, unset):
        jobs = self.local()
        lid = self.choose(
            [
                lid
                for lid, j in jobs.items()
                if j.sync_status != "pending_deletion"
                and not (j.sync_status == "failed" and j.error_kind == "delete")
                and not (j.sync_status == "error" and j.error_kind == "delete")
            ],
            pick,
        )
        if lid is None:
            return
        unset_keys = sorted(jobs[lid].metadata)[:1] if unset else []
        set_meta = {k: v for k, v in metadata.items() if k not in unset_keys}
        update_job(self.store, lid, text, None, set_meta, unset_keys)

    @rule(pick=picks)
    def delete(self, pick):
        lid = self.choose(self.local(), pick)
        if lid is None:
            return
        delete_job(self.store, lid)
        self.must_keep.discard(lid)
        self.deleted_here.add(lid)

    @rule(pick=picks)
    def retry(self, pick):
        lid = self.choose(
            [lid for lid, j in self.local().items() if j.sync_status == "failed"], pick
        )
        if lid is None:
            return
        job = retry_job(self.store, lid)
        assert job.sync_status in ("pending", "pending_deletion")
        assert job.retry_count == 0

    @rule()
    def compact(self):
        before = {lid: j.public() for lid, j in self.local().items()}
        self.store.compact()
        after = {lid: j.public() for lid, j in Store(self.dir, warn=silent).load().items()}
        assert after == before, "compaction changed the jobs"

    @rule()
    def sync(self):
        self.sync_once()

    # ---- server-side rules -------------------------------------------------------------------------

    @rule(pick=picks, text=st.one_of(texts, st.none()), metadata=metas, status=st.booleans())
    def server_edit(self, pick, text, metadata, status):
        sid = self.choose(self.srv.jobs(), pick)
        if sid is None:
            return
        fields = {"text": text, "metadata": metadata}
        if status:
            fields["status"] = "transcribed"
        self.srv.edit(sid, **fields)

    @rule(pick=picks)
    def server_delete(self, pick):
        sid = self.choose(self.srv.jobs(), pick)
        if sid is not None:
            self.srv.delete(sid)
            self.deleted_on_server.add(sid)

    @rule()
    def server_backup(self):
        self.backups.append(self.srv.backup())

    @rule(pick=picks)
    def server_restore(self, pick):
        """The server rolled back to an earlier backup, with `new-history` as documented."""
        if not self.backups:
            return
        state = self.backups[pick % len(self.backups)]
        self.srv.restore(state)
        # Jobs deleted here that the backup still holds come back from it: the admin's doing.
        self.deleted_here -= self.srv.local_ids_of(state)

    @rule(text=st.one_of(texts, st.none()), metadata=metas, uuid_local_id=st.booleans())
    def server_create(self, text, metadata, uuid_local_id):
        # Another client's job: a fresh UUID local_id, or one that is not a UUID at all.
        self.foreign += 1
        self.srv.create(
            local_id=None if uuid_local_id else f"not-a-uuid-{self.foreign}",
            text=text,
            metadata=metadata,
        )

    @rule(
        where=st.sampled_from(TARGETS),
        fault=st.sampled_from(FAULTS),
        times=st.integers(1, 2),
    )
    def inject_fault(self, where, fault, times):
        method, path = where
        self.srv.add_fault(method, path, times, **fault)
        self.faults_armed = True

    # ---- the clean sync and what it promises -------------------------------------------------------

    @rule()
    def clean_sync(self):
        self.srv.clear_faults()
        self.faults_armed = False
        summaries = [self.sync_once(), self.sync_once()]
        if summaries[-1].deletion_guard:
            # The user confirms that the server really was emptied.
            summaries.append(self.sync_once(Policy(3, 0, force_delete=True)))
            summaries.append(self.sync_once())
        last = summaries[-1]
        assert last.skipped is None, f"a clean pass was skipped: {last!r}"
        self.check_converged()

    def check_converged(self):
        local = self.local()
        server = self.srv.jobs()
        for lid, job in local.items():
            assert job.sync_status in ("synced", "failed"), (
                f"after a clean sync job {lid} is {job.sync_status} ({job.last_error})"
            )
            if job.sync_status != "synced":
                continue
            assert job.server_id in server, f"synced job {lid} has no server copy {job.server_id}"
            sj = server[job.server_id]
            assert job.text == (sj["text"] or ""), (lid, job.text, sj["text"])
            assert job.metadata == (sj["metadata"] or {}), (lid, job.metadata, sj["metadata"])
            assert job.retry_count == 0 and job.last_error is None
        known_sids = {j.server_id for j in local.values() if j.server_id}
        for sid, sj in server.items():
            assert sid in known_sids or sj["local_id"] in local, (
                f"server job {sid} ({sj['local_id']}) is unknown here after a clean sync"
            )
        for lid in self.deleted_here:
            if lid in local:
                assert local[lid].sync_status == "failed", (
                    f"deleted job {lid} lingers as {local[lid].sync_status}"
                )
            else:
                on_server = [s for s in server.values() if s["local_id"] == lid]
                assert not on_server, f"job {lid} was deleted here but is still on the server"

    # ---- invariants -------------------------------------------------------------------------------

    @invariant()
    def no_two_server_jobs_share_a_local_id(self):
        seen: dict[str, str] = {}
        for sj in self.srv.jobs().values():
            lid = sj["local_id"]
            assert lid not in seen, f"server jobs {seen[lid]} and {sj['id']} share local_id {lid}"
            seen[lid] = sj["id"]

    @invariant()
    def no_job_the_agent_must_keep_is_lost(self):
        local = self.local()
        missing = self.must_keep - set(local)
        assert not missing, f"jobs lost locally: {sorted(missing)}"

    @invariant()
    def the_store_holds_only_valid_jobs(self):
        statuses = {"pending", "synced", "pending_deletion", "error", "failed"}
        for lid, job in self.local().items():
            assert job.sync_status in statuses
            assert job.retry_count <= POLICY.max_retries
            json.dumps(job.public())
            if job.sync_status == "synced":
                assert job.server_id, f"synced job {lid} without server_id"
                assert job.retry_count == 0


# ---- the two servers fail alike -----------------------------------------------------------------


def _request_through(side: ServerSide, method: str, path: str) -> tuple[str, list[str]]:
    """One request of `method` on `path` (a job or the listing) by the agent's client, with a
    fault armed: what it raised (ids named alike) and the texts the server then holds."""
    side.create(None, "before", {})
    (sid,) = side.jobs()
    remote = side.remote
    try:
        if method == "POST":
            remote.create(str(uuid.uuid4()), "created", {}, None)
        elif method == "PATCH":
            remote.update(sid, {"text": "updated"}, None)
        elif method == "DELETE":
            remote.delete(sid)
        elif path == JOBS:
            list(remote.list_pages(None))
        else:
            remote.get(sid)
        raised = "nothing"
    except RemoteError as exc:
        raised = f"{type(exc).__name__}: {str(exc).replace(sid, '{id}')}"
    return raised, sorted(job["text"] for job in side.jobs().values())


@pytest.mark.parametrize("fault", FAULTS, ids=[next(iter(f)) + str(i) for i, f in enumerate(FAULTS)])
@pytest.mark.parametrize("where", TARGETS, ids=[f"{m} {p}" for m, p in TARGETS])
def test_each_fault_of_the_machine_fails_a_request_in_memory_as_it_does_over_http(where, fault):
    method, path = where
    outcomes = []
    for side_kind in ("http", "memory"):
        side = SIDES[side_kind](False)
        try:
            side.add_fault(method, path, 1, **fault)
            outcomes.append(_request_through(side, method, path))
        finally:
            side.close()
    assert outcomes[1] == outcomes[0]


def machine_for(mode: str, side: str) -> type[SyncMachine]:
    name = f"{mode.title()}{side.title()}SyncMachine"
    return type(name, (SyncMachine,), {"feed": mode == "feed", "side_kind": side})


@pytest.mark.parametrize("side", ["http", "memory"])
@pytest.mark.parametrize("mode", ["listing", "feed"])
def test_random_sync_histories_keep_every_promise_of_the_contract(mode, side):
    run_state_machine_as_test(
        machine_for(mode, side),
        settings=settings(
            max_examples=BUDGET[side][0],
            stateful_step_count=BUDGET[side][1],
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            derandomize="JOBSYNCD_HYPOTHESIS_EXAMPLES" not in os.environ,
            database=None,
        ),
    )
