"""One contract suite of sync passes, several remotes (vdirsyncer's StorageTests idea).

Every case runs `jobsyncd.sync.run_pass` in process, as runner.py sets a pass up (a Store of a
private data dir, a Policy, the pull state kept between passes), against:

- "memory": tests/support/memory_remote.py, the reference server's semantics in memory;
- "reference": the real reference server (`jobsyncd-server`, a process on 127.0.0.1), through
  `remote.Remote` over HTTP: one server for the module, one user (token) per test;

and each in two modes: "feed+batch" (what the server offers is found out, and both servers
offer the change feed and batches) and "listing+single" (the pull state says the server offers
neither, as after a probe: the whole listing, one request per job). A case passes on all four
or the MemoryRemote does not have the server's semantics.

"Another client" edits, deletes and creates jobs on the server between passes; on the real
server through its HTTP API, and "corrupt" (a server bug serving an invalid job object)
through its SQLite database.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import requests
from helpers import RefServer
from memory_remote import MemoryRemote, MemoryServer

from jobsyncd.api import RemoteAPI
from jobsyncd.jobs import create_job, delete_job, retry_job, update_job
from jobsyncd.model import Job
from jobsyncd.remote import Remote
from jobsyncd.store import Store, prepare_data_dir
from jobsyncd.sync import PassSummary, Policy, run_pass

PAGE_LIMIT = 7  # listing pages of 7 jobs: a few dozen jobs take several pages
USERS = 400  # tokens in the module's reference server: one per test

pytestmark = pytest.mark.timeout(120)


# ---- the server side: another client of the same server ----------------------------------------


class ServerSide(Protocol):
    def jobs(self) -> dict[str, dict[str, Any]]: ...

    def create(self, local_id: str, text: str, metadata: dict[str, Any]) -> dict[str, Any]: ...

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]: ...

    def delete(self, job_id: str) -> None: ...

    def corrupt(self, job_id: str) -> None: ...


class MemorySide:
    def __init__(self, server: MemoryServer) -> None:
        self.server = server

    def jobs(self) -> dict[str, dict[str, Any]]:
        return self.server.jobs()

    def create(self, local_id: str, text: str, metadata: dict[str, Any]) -> dict[str, Any]:
        return self.server.create(local_id, text, metadata)[0]

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        return self.server.update(job_id, fields)

    def delete(self, job_id: str) -> None:
        self.server.delete(job_id)

    def corrupt(self, job_id: str) -> None:
        self.server.corrupt(job_id)


class ReferenceSide:
    def __init__(self, url: str, token: str, user: str, db: Path) -> None:
        self.api = url + "/api/v1"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.user = user
        self.db = db

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = requests.request(
            method, self.api + path, headers=self.headers, timeout=10, **kwargs
        )
        assert response.status_code < 300, f"{method} {path}: {response.status_code}"
        return response

    def jobs(self) -> dict[str, dict[str, Any]]:
        out, cursor = {}, None
        for _ in range(1000):
            params = {"limit": 5000, **({"cursor": cursor} if cursor else {})}
            page = self._call("GET", "/jobs", params=params).json()
            out.update({job["id"]: job for job in page["jobs"]})
            cursor = page["next_cursor"]
            if not cursor:
                return out
        raise AssertionError("the listing did not end")

    def create(self, local_id: str, text: str, metadata: dict[str, Any]) -> dict[str, Any]:
        body = {"local_id": local_id, "text": text, "metadata": metadata}
        job: dict[str, Any] = self._call("POST", "/jobs", json=body).json()
        return job

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        job: dict[str, Any] = self._call("PATCH", f"/jobs/{job_id}", json=fields).json()
        return job

    def delete(self, job_id: str) -> None:
        self._call("DELETE", f"/jobs/{job_id}")

    def corrupt(self, job_id: str) -> None:
        """Metadata that is not an object, written into the server's database as a change of
        the job (a new counter value): the server then serves an invalid job object."""
        with sqlite3.connect(self.db, timeout=10) as conn:
            (version,) = conn.execute(
                'UPDATE collections SET version = version + 1 WHERE "user" = ? RETURNING version',
                (self.user,),
            ).fetchone()
            changed = conn.execute(
                "UPDATE jobs SET metadata = '[]', change_seq = ? WHERE id = ?", (version, job_id)
            ).rowcount
        conn.close()
        assert changed == 1


# ---- the agent: a store, a pull state and passes -------------------------------------------


class Agent:
    """What runner.execute_pass sets up for a pass, kept between passes as the files would be."""

    def __init__(self, data_dir: Path, remote: RemoteAPI, mode: str) -> None:
        self.warnings: list[str] = []
        self.store = Store(prepare_data_dir(str(data_dir)), warn=self.warnings.append)
        self.remote = remote
        self.pull_state: dict[str, Any] = {}
        if mode == "listing+single":
            told = {"offered": False, "checked_at": time.time()}
            self.pull_state = {"feed": dict(told), "batch": dict(told)}

    def sync(self, force_delete: bool = False) -> PassSummary:
        policy = Policy(max_retries=3, backoff_base_seconds=0, force_delete=force_delete)
        try:
            return run_pass(self.store, self.remote, policy, pull_state=self.pull_state)
        finally:
            self.store.unload()  # as the daemon does between passes (the next folds anew)

    def jobs(self) -> dict[str, Job]:
        try:
            return {lid: job.copy() for lid, job in self.store.load().items()}
        finally:
            self.store.unload()

    def job(self, local_id: str) -> Job:
        return self.jobs()[local_id]


class Backend:
    def __init__(self, name: str, remote: RemoteAPI, side: ServerSide) -> None:
        self.name = name
        self.remote = remote
        self.side = side


_users = itertools.count()


@pytest.fixture(scope="module")
def reference_server(server_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("contract-server")
    tokens = {f"user{i:04d}": secrets.token_urlsafe(24) for i in range(USERS)}
    token_file = workdir / "tokens"
    token_file.write_text("".join(f"{user} {token}\n" for user, token in tokens.items()))
    srv = RefServer(server_bin, workdir, token_file=token_file).start()
    srv.tokens = tokens  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=["memory", "reference"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        server = MemoryServer()
        yield Backend("memory", MemoryRemote(server, page_limit=PAGE_LIMIT), MemorySide(server))
        return
    srv = request.getfixturevalue("reference_server")
    user = f"user{next(_users):04d}"
    token = srv.tokens[user]
    remote = Remote(srv.url + "/api/v1", token=token, timeout=5, page_limit=PAGE_LIMIT)
    try:
        yield Backend(
            "reference", remote, ReferenceSide(srv.url, token, user, srv.workdir / "server.db")
        )
    finally:
        remote.close()


@pytest.fixture(params=["feed+batch", "listing+single"])
def agent(request: pytest.FixtureRequest, backend: Backend, tmp_path: Path) -> Agent:
    return Agent(tmp_path / "agent", backend.remote, request.param)


@pytest.fixture
def side(backend: Backend) -> ServerSide:
    return backend.side


def by_local_id(side: ServerSide) -> dict[str, dict[str, Any]]:
    return {job["local_id"]: job for job in side.jobs().values()}


def synced_job(agent: Agent, text: str = "t", metadata: dict[str, Any] | None = None) -> Job:
    job = create_job(agent.store, text, None, metadata if metadata is not None else {"k": 1})
    summary = agent.sync()
    assert summary.ok and summary.created == 1, summary
    synced = agent.job(job.local_id)
    assert synced.sync_status == "synced" and synced.server_id is not None
    return synced


def counts(summary: PassSummary) -> dict[str, Any]:
    public = summary.public()
    return {k: v for k, v in public.items() if v not in (0, None, False)}


# ---- both implementations have the same surface -----------------------------------------------


def _signature(function: Any) -> list[tuple[str, Any]]:
    params = list(inspect.signature(function).parameters.values())
    return [(p.name, p.default) for p in params if p.name != "self"]


@pytest.mark.parametrize("implementation", [Remote, MemoryRemote])
def test_every_remote_offers_each_method_of_the_protocol_with_its_parameters(implementation):
    methods = [
        name
        for name, member in vars(RemoteAPI).items()
        if callable(member) and not name.startswith("_")
    ]
    assert {"create", "update", "delete", "get", "list_pages", "changes", "batch"} <= set(methods)
    for name in methods:
        ours = getattr(implementation, name)
        assert _signature(ours) == _signature(getattr(RemoteAPI, name)), name


def test_each_mode_reads_the_server_the_way_it_names(agent, request):
    synced_job(agent)
    delete_job(agent.store, create_job(agent.store, "x", None, {}).local_id)
    assert agent.sync().ok
    state = agent.pull_state
    if "feed+batch" in request.node.callspec.id:
        assert state["feed"]["offered"] is True and state["batch"]["offered"] is True
        assert isinstance(state.get("checkpoint"), str) and "etag" not in state
    else:
        assert state["feed"]["offered"] is False and state["batch"]["offered"] is False
        assert isinstance(state.get("etag"), str) and "checkpoint" not in state


# ---- push -----------------------------------------------------------------------------------


def test_a_new_job_is_created_on_the_server_and_becomes_synced(agent, side):
    job = create_job(agent.store, "hello", None, {"k": 1, "who": "ü"})
    summary = agent.sync()
    assert summary.ok and counts(summary) == {"ok": True, "created": 1}
    local = agent.job(job.local_id)
    server = by_local_id(side)[job.local_id]
    assert local.sync_status == "synced" and local.server_id == server["id"]
    assert (server["text"], server["metadata"]) == ("hello", {"k": 1, "who": "ü"})
    assert local.server_status == server["status"] == "submitted"
    assert local.retry_count == 0 and local.last_error is None


def test_a_job_with_audio_goes_up_with_its_audio(agent, side, tmp_path):
    sound = os.urandom(3000)
    source = tmp_path / "memo.wav"
    source.write_bytes(sound)
    job = create_job(agent.store, "with audio", str(source), {})
    summary = agent.sync()
    assert summary.ok and summary.created == 1
    local = agent.job(job.local_id)
    audio = by_local_id(side)[job.local_id]["audio"]
    assert audio["sha256"] == hashlib.sha256(sound).hexdigest() and audio["size"] == len(sound)
    assert local.sync_status == "synced" and local.audio_sent == local.audio_file


def test_an_edit_is_sent_as_an_update_and_the_job_is_synced_again(agent, side):
    job = synced_job(agent)
    update_job(agent.store, job.local_id, "edited", None, {"n": 2}, [])
    summary = agent.sync()
    assert counts(summary) == {"ok": True, "updated": 1}
    server = side.jobs()[job.server_id]
    assert (server["text"], server["metadata"]) == ("edited", {"k": 1, "n": 2})
    assert agent.job(job.local_id).sync_status == "synced"


def test_an_audio_removed_here_is_removed_on_the_server(agent, side, tmp_path):
    source = tmp_path / "memo.wav"
    source.write_bytes(b"RIFF" + os.urandom(100))
    job = create_job(agent.store, "a", str(source), {})
    agent.sync()
    update_job(agent.store, job.local_id, None, None, {}, [], remove_audio=True)
    summary = agent.sync()
    assert counts(summary) == {"ok": True, "updated": 1}
    assert by_local_id(side)[job.local_id]["audio"] is None
    local = agent.job(job.local_id)
    assert local.sync_status == "synced" and local.audio_file is None and local.audio_sent is None


def test_fields_edited_here_and_on_the_server_merge_field_by_field(agent, side):
    job = synced_job(agent, metadata={"k": 1})
    side.update(job.server_id, metadata={"k": 1, "by": "another client"})
    update_job(agent.store, job.local_id, "mine", None, {}, [])
    summary = agent.sync()
    assert summary.ok and summary.updated == 1
    local = agent.job(job.local_id)
    assert (local.text, local.metadata) == ("mine", {"k": 1, "by": "another client"})
    server = side.jobs()[job.server_id]
    assert (server["text"], server["metadata"]) == ("mine", {"k": 1, "by": "another client"})
    assert local.sync_status == "synced"


def test_a_field_changed_here_is_never_overwritten_by_the_servers_edit_of_it(agent, side):
    job = synced_job(agent)
    side.update(job.server_id, text="the server's")
    update_job(agent.store, job.local_id, "mine", None, {}, [])
    summary = agent.sync()
    assert summary.ok and summary.updated == 1
    assert agent.job(job.local_id).text == side.jobs()[job.server_id]["text"] == "mine"


def test_a_local_deletion_deletes_the_server_copy_then_the_job_here(agent, side):
    job = synced_job(agent)
    delete_job(agent.store, job.local_id)
    summary = agent.sync()
    assert counts(summary) == {"ok": True, "deleted_remote": 1}
    assert job.local_id not in agent.jobs()
    assert side.jobs() == {}


def test_deleting_a_job_the_server_already_lost_completes(agent, side):
    job = synced_job(agent)
    side.delete(job.server_id)
    delete_job(agent.store, job.local_id)
    summary = agent.sync()
    assert summary.ok and summary.deleted_remote == 1 and summary.deleted_locally == 0
    assert agent.jobs() == {}


def test_a_create_the_server_refuses_fails_at_once_and_reaches_nothing(agent, side):
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(40):
        inner["d"] = {}
        inner = inner["d"]
    job = create_job(agent.store, "too deep", None, deep)
    summary = agent.sync()
    assert not summary.ok and summary.failed == 1 and summary.created == 0
    local = agent.job(job.local_id)
    assert local.sync_status == "failed" and local.retry_count == 0
    assert "(422)" in (local.last_error or "") and "nests deeper" in (local.last_error or "")
    assert side.jobs() == {}


def test_many_jobs_go_up_and_come_down_across_listing_pages(agent, side):
    mine = [create_job(agent.store, f"mine {i}", None, {"i": i}).local_id for i in range(20)]
    theirs = [str(uuid.uuid4()) for _ in range(9)]
    for i, local_id in enumerate(theirs):
        side.create(local_id, f"theirs {i}", {"i": i})
    summary = agent.sync()
    assert counts(summary) == {"ok": True, "created": 20, "pulled": 9}
    local = agent.jobs()
    assert set(local) == set(mine) | set(theirs)
    assert all(j.sync_status == "synced" for j in local.values())
    assert len(side.jobs()) == 29


# ---- pull --------------------------------------------------------------------------------------


def test_a_job_another_client_created_is_pulled_under_its_local_id(agent, side):
    local_id = str(uuid.uuid4())
    server = side.create(local_id.upper(), "from elsewhere", {"x": [1, 2]})
    summary = agent.sync()
    assert counts(summary) == {"ok": True, "pulled": 1}
    local = agent.job(local_id)
    assert local.server_id == server["id"] and local.sync_status == "synced"
    assert (local.text, local.metadata) == ("from elsewhere", {"x": [1, 2]})


def test_an_edit_on_the_server_of_a_synced_job_wins_here(agent, side):
    job = synced_job(agent)
    side.update(job.server_id, text="from the server", status="done")
    summary = agent.sync()
    assert counts(summary) == {"ok": True, "pulled": 1}
    local = agent.job(job.local_id)
    assert (local.text, local.server_status, local.sync_status) == (
        "from the server",
        "done",
        "synced",
    )


@pytest.mark.parametrize("field", ["status", "metadata"])
def test_a_server_edit_of_one_field_wins_here_also_in_a_pass_that_pushed(agent, side, field):
    """A pass that pushes folds the store, so the feed's changes are compared with the jobs it
    holds (pull.py's held test): a change of the status alone, or of the metadata alone, is a
    change all the same."""
    job = synced_job(agent, metadata={"a": 1})
    edit = {"status": "done"} if field == "status" else {"metadata": {"a": 2}}
    side.update(job.server_id, **edit)
    create_job(agent.store, "pushed in the same pass", None, {})
    summary = agent.sync()
    assert counts(summary) == {"ok": True, "created": 1, "pulled": 1}
    local = agent.job(job.local_id)
    assert (local.server_status, local.metadata) == (
        ("done", {"a": 1}) if field == "status" else ("submitted", {"a": 2})
    )


def test_a_job_changed_twice_during_one_feed_read_ends_as_its_last_change(
    backend, side, tmp_path, monkeypatch
):
    """A job changed again while the pass reads the feed comes once more on a later page: it is
    compared with what the earlier page made of it, not with the job as the read began."""
    from jobsyncd.sync import pull

    agent = Agent(tmp_path / "agent", backend.remote, "feed+batch")
    job = synced_job(agent, text="A")
    side.update(job.server_id, text="B")  # page 1: B, then the jobs made below
    for i in range(3):
        side.create(str(uuid.uuid4()), f"made there {i}", {})
    monkeypatch.setattr(pull, "FEED_PAGE_LIMIT", 2)
    read = backend.remote.changes
    calls = []

    def changes(*args: Any, **kwargs: Any) -> Any:
        page = read(*args, **kwargs)
        calls.append(len(page.items))
        if len(calls) == 1:
            side.update(job.server_id, text="A")  # back to A: on the feed's last page
        return page

    monkeypatch.setattr(backend.remote, "changes", changes)
    create_job(agent.store, "pushed in the same pass", None, {})  # the pass folds the store
    summary = agent.sync()
    assert summary.ok, summary
    assert len(calls) >= 3 and summary.pulled == 3 + 2, (calls, summary)
    assert agent.job(job.local_id).text == "A" == side.jobs()[job.server_id]["text"]


def test_a_job_deleted_on_the_server_is_removed_here(agent, side):
    gone, kept = synced_job(agent), synced_job(agent)
    side.delete(gone.server_id)
    summary = agent.sync()
    assert counts(summary) == {"ok": True, "deleted_locally": 1}
    assert set(agent.jobs()) == {kept.local_id}


def test_the_deletion_guard_keeps_every_job_when_the_server_lost_them_all(agent, side):
    first, second = synced_job(agent), synced_job(agent)
    side.delete(first.server_id)
    side.delete(second.server_id)
    summary = agent.sync()
    assert summary.deletion_guard and not summary.ok and summary.deleted_locally == 0
    assert {j.sync_status for j in agent.jobs().values()} == {"synced"}
    forced = agent.sync(force_delete=True)
    assert forced.deleted_locally == 2
    assert agent.jobs() == {}


def test_a_pass_with_nothing_to_do_changes_nothing(agent, side):
    synced_job(agent)
    agent.sync()
    size, state = os.path.getsize(agent.store.path), json.dumps(agent.pull_state)
    summary = agent.sync()
    assert counts(summary) == {"ok": True}
    assert os.path.getsize(agent.store.path) == size
    assert json.dumps(agent.pull_state) == state


def test_an_invalid_job_object_is_skipped_and_the_rest_applies(agent, side):
    kept, broken = synced_job(agent), synced_job(agent, metadata={"b": 1})
    side.corrupt(broken.server_id)
    other = str(uuid.uuid4())
    side.create(other, "new", {})
    summary = agent.sync()
    assert not summary.ok and summary.pulled == 1 and summary.deleted_locally == 0
    local = agent.jobs()
    assert set(local) == {kept.local_id, broken.local_id, other}
    assert local[broken.local_id].metadata == {"b": 1}
    side.update(broken.server_id, metadata={"fixed": True})  # the server's fix
    healed = agent.sync()
    assert healed.ok and healed.pulled == 1
    assert agent.job(broken.local_id).metadata == {"fixed": True}


# ---- matching by local_id (6.3, 6.4) -------------------------------------------------------


def test_a_create_the_server_already_holds_is_matched_by_local_id_not_duplicated(agent, side):
    job = create_job(agent.store, "mine", None, {})
    side.create(job.local_id, "an older version", {})  # a POST whose answer was lost
    first = agent.sync()
    assert first.created == 1
    assert agent.job(job.local_id).sync_status == "pending"  # ours is newer: sent again
    second = agent.sync()
    assert second.ok and second.updated == 1
    on_server = [j for j in side.jobs().values() if j["local_id"] == job.local_id]
    assert len(on_server) == 1 and on_server[0]["text"] == "mine"
    local = agent.job(job.local_id)
    assert local.sync_status == "synced" and local.server_id == on_server[0]["id"]


def test_a_job_recreated_on_the_server_under_its_local_id_is_rebound_not_doubled(agent, side):
    job = synced_job(agent)
    side.delete(job.server_id)
    again = side.create(job.local_id, "restored", {"k": 1})  # a restore, or another agent
    summary = agent.sync()
    assert summary.ok and summary.deleted_locally == 0
    local = agent.jobs()
    assert list(local) == [job.local_id]
    assert local[job.local_id].server_id == again["id"]
    assert local[job.local_id].text == "restored"


def test_an_update_of_a_job_the_server_lost_fails_as_gone_and_retry_creates_it_again(
    agent, side
):
    job = synced_job(agent)
    side.delete(job.server_id)
    update_job(agent.store, job.local_id, "edited", None, {}, [])
    summary = agent.sync()
    assert summary.failed == 1 and not summary.ok
    failed = agent.job(job.local_id)
    assert (failed.sync_status, failed.error_kind) == ("failed", "gone")
    retry_job(agent.store, job.local_id)
    again = agent.sync()
    assert again.ok and again.created == 1
    server = by_local_id(side)[job.local_id]
    assert server["text"] == "edited" and server["id"] != job.server_id
    assert agent.job(job.local_id).server_id == server["id"]


def test_batches_go_with_a_short_switch_interval_and_leave_it_as_they_were(tmp_path, monkeypatch):
    """The thread waiting for a batch's answer gets the GIL soon after it arrives (push.py's
    BATCH_SWITCH_INTERVAL); the interpreter's own interval is back after the pass, also when
    the batch fails."""
    import sys

    from jobsyncd.sync import push

    server = MemoryServer()
    remote = MemoryRemote(server, page_limit=PAGE_LIMIT)
    agent = Agent(tmp_path / "agent", remote, "feed+batch")
    seen: list[float] = []
    send = remote.batch_results

    def watched(operations: Any) -> Any:
        seen.append(sys.getswitchinterval())
        return send(operations)

    monkeypatch.setattr(remote, "batch_results", watched)
    before = sys.getswitchinterval()
    assert before > push.BATCH_SWITCH_INTERVAL
    for i in range(3):
        create_job(agent.store, f"job {i}", None, {})
    assert agent.sync().created == 3
    assert seen == [push.BATCH_SWITCH_INTERVAL]
    assert sys.getswitchinterval() == before

    def broken(operations: Any) -> Any:
        seen.append(sys.getswitchinterval())
        raise RuntimeError("a bug in the middle of a batch")

    monkeypatch.setattr(remote, "batch_results", broken)
    create_job(agent.store, "one more", None, {})
    with pytest.raises(RuntimeError):
        agent.sync()
    assert seen[-1] == push.BATCH_SWITCH_INTERVAL
    assert sys.getswitchinterval() == before
