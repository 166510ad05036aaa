"""Black-box tests of the pull on the change feed (contract 6.7): the installed `jobsyncd sync`
against the fault server with its `/changes` endpoint turned on.

A pass reads what changed since its stored checkpoint instead of the whole listing; tombstones
remove synced jobs without a confirming GET (the deletion guard still applies); a 410 `expired`
resyncs with GET-confirmed removals, a 410 `diverged` (a restore) resyncs and creates again every
job the server lost; a server without the feed is read in listing mode and asked again a day later.
"""

from __future__ import annotations

import json
import time

import pytest
from helpers import jobs_by_id, sync_json

pytestmark = pytest.mark.timeout(60)

JOBS = "/api/v1/jobs"
CHANGES = "/api/v1/changes"


@pytest.fixture
def srv(fault_server):
    fault_server.feed = True
    return fault_server


@pytest.fixture
def agent(cli, srv):
    cli.env["JOBSYNCD_SERVER_URL"] = srv.url
    cli.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = "2"
    return cli


sync = sync_json


def create(cli, text: str) -> str:
    return cli("create", "--text", text, check=True).stdout.strip()


by_id = jobs_by_id


def gets(srv, path: str) -> int:
    return sum(1 for m, p, _ in srv.all_requests if m == "GET" and p.split("?")[0] == path)


def test_a_pass_reads_the_changes_not_the_listing(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(3)]
    sync(agent, want=0)
    srv.server_edit(srv.job_by_local_id(ids[1])["id"], status="done", text="edited there")
    srv.clear_requests()
    _, summary, _ = sync(agent, want=0)
    assert summary["pulled"] == 1
    assert by_id(agent)[ids[1]]["text"] == "edited there"
    assert by_id(agent)[ids[1]]["server_status"] == "done"
    assert gets(srv, JOBS) == 0 and gets(srv, CHANGES) >= 1
    srv.clear_requests()
    _, summary, _ = sync(agent, want=0)
    assert summary["pulled"] == 0
    assert [m for m, _, _ in srv.requests] == ["GET"], "a no-change pass is one request"


def test_a_tombstone_removes_the_synced_job_without_a_confirming_get(agent, srv):
    keep = create(agent, "keep")
    gone = create(agent, "gone")
    sync(agent, want=0)
    sid = srv.job_by_local_id(gone)["id"]
    srv.server_delete(sid)
    srv.clear_requests()
    _, summary, _ = sync(agent, want=0)
    assert summary["deleted_locally"] == 1
    assert list(by_id(agent)) == [keep]
    assert gets(srv, f"{JOBS}/{sid}") == 0


def test_a_tombstone_never_removes_a_job_with_a_local_change(agent, srv):
    edited = create(agent, "x")
    create(agent, "other")
    sync(agent, want=0)
    agent("update", edited, "--text", "mine", check=True)
    srv.server_delete(srv.job_by_local_id(edited)["id"])
    sync(agent)
    assert by_id(agent)[edited]["text"] == "mine"


def test_tombstones_for_every_synced_job_trip_the_deletion_guard(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(3)]
    sync(agent, want=0)
    for job in srv.snapshot():
        srv.server_delete(job["id"])
    _, summary, stderr = sync(agent, want=1)
    assert summary["deletion_guard"] is True
    assert "--reupload" in stderr and "--force-delete" in stderr
    assert set(by_id(agent)) == set(ids)
    _, summary, _ = sync(agent, want=1)  # the checkpoint did not move: the guard trips again
    assert summary["deletion_guard"] is True
    _, summary, _ = sync(agent, "--force-delete", want=0)
    assert summary["deleted_locally"] == 3
    assert by_id(agent) == {}


def test_a_job_deleted_and_created_again_under_its_local_id_is_rebound_by_the_feed(agent, srv):
    a = create(agent, "a")
    create(agent, "b")
    sync(agent, want=0)
    old = srv.job_by_local_id(a)["id"]
    srv.server_delete(old)
    new = srv.server_create(local_id=a, text="restored")["id"]
    srv.clear_requests()
    _, summary, _ = sync(agent, want=0)
    assert summary["deleted_locally"] == 0
    job = by_id(agent)[a]
    assert job["server_id"] == new and job["text"] == "restored"
    assert gets(srv, f"{JOBS}/{old}") == 0, "the old id's tombstone says it is gone"
    assert len(by_id(agent)) == 2


def test_an_expired_checkpoint_resyncs_and_removes_only_what_a_get_confirms(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(3)]
    sync(agent, want=0)
    sid = srv.job_by_local_id(ids[0])["id"]
    srv.server_delete(sid)
    srv.expire_tombstones()
    _, summary, stderr = sync(agent, want=0)
    assert "expired" in stderr
    assert summary["deleted_locally"] == 1
    assert set(by_id(agent)) == set(ids[1:])
    assert gets(srv, f"{JOBS}/{sid}") == 1


@pytest.mark.parametrize("new_history", [True, False], ids=["new-history", "no-new-history"])
def test_a_server_restored_from_a_backup_gets_back_every_job(agent, srv, new_history):
    before = [create(agent, f"before {i}") for i in range(2)]
    sync(agent, want=0)
    backup = srv.backup()
    after = [create(agent, f"after {i}") for i in range(3)]
    sync(agent, want=0)
    srv.restore(backup, new_history=new_history)
    _, summary, stderr = sync(agent, want=0)
    assert summary["reuploaded"] == 3 and summary["deleted_locally"] == 0
    assert "diverged" in stderr or "restored" in stderr
    _, summary, _ = sync(agent, want=0)
    assert summary["created"] == 3
    assert sorted(j["local_id"] for j in srv.snapshot()) == sorted(before + after)
    assert all(j["sync_status"] == "synced" for j in agent.jobs())


def test_a_feed_that_never_ends_is_cut_off_and_removes_nothing(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(2)]
    sync(agent, want=0)
    srv.feed_loop = True
    started = time.monotonic()
    _, summary, _ = sync(agent, want=1)
    assert time.monotonic() - started < 30
    assert set(by_id(agent)) == set(ids)


def test_a_server_without_the_feed_is_read_by_listing_and_asked_again_after_a_day(agent, srv):
    srv.feed = False
    create(agent, "x")
    sync(agent, want=0)
    assert gets(srv, CHANGES) == 1 and gets(srv, JOBS) == 1
    srv.clear_requests()
    sync(agent, want=0)
    assert gets(srv, CHANGES) == 0, "asked again only after a day"
    state_file = agent.data_dir / "pull_state.json"
    state = json.loads(state_file.read_text())
    state["feed"]["checked_at"] -= 2 * 86400
    state_file.write_text(json.dumps(state))
    srv.feed = True
    srv.clear_requests()
    sync(agent, want=0)
    assert gets(srv, CHANGES) >= 1 and gets(srv, JOBS) == 0


def test_invalid_changes_are_skipped_and_the_rest_applies(agent, srv):
    create(agent, "x")
    sync(agent, want=0)
    good = srv.server_create(text="good")
    bad = srv.server_create(text="bad")
    srv.server_edit(bad["id"], created_at="0001-01-01T00:00:00+01:00")
    rc, summary, stderr = sync(agent)
    assert rc == 1 and bad["id"] in stderr
    assert good["id"] in {j["server_id"] for j in agent.jobs()}
