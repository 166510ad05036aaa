"""Black-box tests of the sync pass against hostile or surprising servers (issue 9, contract 6.3,
6.4, 6.7's listing-mode rules and 6.9): restores under the same local_id, invalid job objects,
answers naming another job's server id, `--reupload`, clocks that were ahead, and `-v` lines.

Each runs the installed `jobsyncd` against the in-process fault server on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from helpers import jobs_by_id, sync_json

pytestmark = pytest.mark.timeout(60)

JOBS = "/api/v1/jobs"


@pytest.fixture
def srv(fault_server):
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


def append_record(cli, record: dict) -> None:
    """Append a raw line to the store, as an older jobsyncd (or a crash) may have left it."""
    cli.data_dir.mkdir(mode=0o700, exist_ok=True)
    with open(cli.data_dir / "jobs.jsonl", "a") as fh:
        fh.write(json.dumps(record, separators=(",", ":")) + "\n")


def stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def record(local_id: str, **fields) -> dict:
    now = stamp(dt.datetime.now(dt.timezone.utc))
    rec = {
        "local_id": local_id,
        "server_id": None,
        "text": "",
        "audio_file": None,
        "metadata": {},
        "server_status": None,
        "sync_status": "pending",
        "retry_count": 0,
        "last_sync_attempt_at": None,
        "last_error": None,
        "created_at": now,
        "updated_at": now,
        "rev": 0,
    }
    rec.update(fields)
    return rec


# ---- item 1: a job re-created on the server under the same local_id ---------------------------


def test_a_job_recreated_on_the_server_under_its_local_id_stays_one_local_job(agent, srv):
    a = create(agent, "first")
    sync(agent, want=0)
    old = srv.job_by_local_id(a)["id"]
    agent("update", a, "--text", "edited here", check=True)
    # Another client deletes A on the server and creates it again under A's local_id (a restore).
    srv.server_delete(old)
    new = srv.server_create(local_id=a, text="restored copy")["id"]
    sync(agent)  # PATCH to the old id: 404; the pull rebinds A to the new id
    jobs = by_id(agent)
    assert list(jobs) == [a], "the re-created job must not become a second local job"
    assert jobs[a]["server_id"] == new
    assert jobs[a]["sync_status"] == "pending"  # the local edit still goes to the server
    assert jobs[a]["text"] == "edited here"
    sync(agent, want=0)
    assert srv.job(new)["text"] == "edited here"
    assert by_id(agent)[a]["sync_status"] == "synced"
    assert len(srv.snapshot()) == 1


def test_a_synced_job_recreated_on_the_server_is_rebound_not_removed(agent, srv):
    a = create(agent, "one")
    b = create(agent, "two")
    sync(agent, want=0)
    old = srv.job_by_local_id(a)["id"]
    srv.server_delete(old)
    new = srv.server_create(local_id=a, text="from the backup")["id"]
    _, summary, _ = sync(agent, want=0)
    assert summary["deleted_locally"] == 0
    assert summary["pulled"] == 1
    jobs = by_id(agent)
    assert set(jobs) == {a, b}
    assert jobs[a]["server_id"] == new and jobs[a]["text"] == "from the backup"
    assert len(srv.snapshot()) == 2


def test_a_server_job_carrying_our_local_id_beside_our_own_copy_is_another_job(agent, srv):
    a = create(agent, "mine")
    sync(agent, want=0)
    mine = srv.job_by_local_id(a)["id"]
    other = srv.server_create(local_id=a, text="a third party's job")["id"]
    sync(agent, want=0)
    jobs = by_id(agent)
    assert jobs[a]["server_id"] == mine, "our binding stays while our server copy exists"
    assert other in {j["server_id"] for j in jobs.values()}
    assert len(jobs) == 2


def test_deleting_a_rebound_job_deletes_only_its_own_server_copy(agent, srv):
    a = create(agent, "mine")
    other = create(agent, "other")
    sync(agent, want=0)
    srv.server_delete(srv.job_by_local_id(a)["id"])
    new = srv.server_create(local_id=a, text="again")["id"]
    sync(agent, want=0)
    agent("delete", a, check=True)
    sync(agent, want=0)
    assert srv.job(new) is None
    assert srv.job_by_local_id(other) is not None
    assert list(by_id(agent)) == [other]


def test_a_store_holding_one_server_id_twice_is_repaired_and_a_stray_delete_touches_no_server(
    agent, srv
):
    a = create(agent, "real")
    sync(agent, want=0)
    sid = srv.job_by_local_id(a)["id"]
    # What jobsyncd before this fix could leave: a stray second local job bound to A's server id,
    # which the user then deletes.
    stray = str(uuid.uuid4())
    append_record(
        agent,
        record(stray, server_id=sid, sync_status="pending_deletion", text="real", create_sent=True),
    )
    proc = agent("list", "--json")
    assert proc.returncode == 0
    assert "bound to 2 local jobs" in proc.stderr
    shown = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [j["server_id"] for j in shown if j["server_id"]] == [sid]
    _, summary, _ = sync(agent, want=0)
    assert summary["deleted_remote"] == 0
    assert srv.job(sid) is not None, "deleting the stray must not delete A's server copy"
    assert list(by_id(agent)) == [a]
    # The repair was written: the next load warns no more.
    assert "bound to" not in agent("list").stderr


def test_a_create_answer_naming_another_local_jobs_server_id_is_an_error(agent, srv):
    a = create(agent, "a")
    sync(agent, want=0)
    sid = srv.job_by_local_id(a)["id"]
    b = create(agent, "b")
    answer = dict(srv.job(sid))
    answer["local_id"] = b  # a lying server: B's create answered with A's server job
    srv.add_fault("POST", JOBS, status=201, body=answer)
    _, summary, stderr = sync(agent, want=1)
    assert summary["errors"] == 1
    jobs = by_id(agent)
    assert jobs[b]["sync_status"] == "error" and jobs[b]["server_id"] is None
    assert jobs[a]["server_id"] == sid and jobs[a]["sync_status"] == "synced"
    assert "belongs to local job" in jobs[b]["last_error"]
    sync(agent, want=0)  # the honest server now: B gets its own server copy
    jobs = by_id(agent)
    assert jobs[b]["server_id"] not in (None, sid)


# ---- items 3 and 4: invalid job objects -------------------------------------------------------

POISONS = {
    "year-one": {"created_at": "0001-01-01T00:00:00+01:00"},
    "year-10000": {"updated_at": "10000-01-01T00:00:00Z"},
    "not-a-time": {"created_at": "yesterday"},
    "infinite": {"metadata": {"x": float("inf")}},
    "lone-surrogate": {"metadata": {"x": "\ud800"}},
    "lone-surrogate-text": {"text": "a\udc00b"},
    "deep": {"metadata": json.loads('{"a":' * 40 + "1" + "}" * 40)},
    "text-not-string": {"text": 42},
}


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_an_invalid_job_in_the_listing_is_skipped_and_the_rest_applies(agent, srv, poison):
    kept = create(agent, "kept")
    sync(agent, want=0)
    good = srv.server_create(text="good one")
    bad = srv.server_create(text="bad one")
    srv.server_edit(bad["id"], **POISONS[poison])
    srv.server_delete(srv.job_by_local_id(kept)["id"])  # would be removed by a complete pull
    rc, summary, stderr = sync(agent)
    assert rc == 1 and summary["ok"] is False
    assert bad["id"] in stderr and "invalid" in stderr
    texts = {j["text"] for j in agent.jobs()}
    assert "good one" in texts, "the rest of the page must apply"
    assert "bad one" not in texts
    assert summary["deleted_locally"] == 0 and kept in by_id(agent), "nothing removed"
    assert good["id"] in {j["server_id"] for j in agent.jobs()}
    for line in agent("list", "--json", check=True).stdout.splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))


def test_an_invalid_create_answer_records_its_server_id_so_a_delete_reaches_the_copy(agent, srv):
    a = create(agent, "x")
    stored = srv.server_create(local_id=a, text="x")  # the server has it...
    answer = dict(stored)
    answer["created_at"] = "0001-01-01T00:00:00+01:00"  # ...and answers with a broken job
    srv.add_fault("POST", JOBS, status=200, body=answer)
    rc, summary, stderr = sync(agent)
    assert rc == 1 and summary["errors"] == 1
    job = by_id(agent)[a]
    assert job["sync_status"] == "error"
    assert job["server_id"] == stored["id"]
    agent("delete", a, check=True)
    sync(agent, want=0)
    assert srv.job(stored["id"]) is None, "the delete must reach the server copy"
    assert by_id(agent) == {}


# ---- item 2: a server restored from a backup, in listing mode ----------------------------------


def test_the_deletion_guard_offers_both_ways_out(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(3)]
    sync(agent, want=0)
    for job in srv.snapshot():
        srv.server_delete(job["id"])
    _, summary, stderr = sync(agent, want=1)
    assert summary["deletion_guard"] is True
    assert "--reupload" in stderr and "--force-delete" in stderr
    assert set(by_id(agent)) == set(ids)


def test_sync_reupload_creates_again_the_jobs_a_restored_server_lost(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(3)]
    sync(agent, want=0)
    for job in srv.snapshot():
        srv.server_delete(job["id"])
    _, summary, stderr = sync(agent, "--reupload", want=0)
    assert summary["reuploaded"] == 3 and summary["deletion_guard"] is False
    assert summary["deleted_locally"] == 0
    jobs = by_id(agent)
    assert all(j["sync_status"] == "pending" and j["server_id"] is None for j in jobs.values())
    _, summary, _ = sync(agent, want=0)
    assert summary["created"] == 3
    assert sorted(j["local_id"] for j in srv.snapshot()) == sorted(ids)
    assert all(j["sync_status"] == "synced" for j in agent.jobs())


def test_reupload_and_force_delete_are_exclusive(agent):
    proc = agent("sync", "--reupload", "--force-delete")
    assert proc.returncode == 2
    assert "jobsyncd: error:" in proc.stderr or "Error:" in proc.stderr


def test_every_sync_summary_has_reuploaded(agent, srv):
    _, summary, _ = sync(agent, want=0)
    assert summary["reuploaded"] == 0


# ---- item 9: a clock that was ahead -----------------------------------------------------------


def test_a_next_attempt_recorded_a_day_ahead_counts_as_over(agent, srv):
    agent.env["JOBSYNCD_BACKOFF_BASE_SECONDS"] = "15"  # longest legit wait: 15 * 2^4 = 240 s
    now = dt.datetime.now(dt.timezone.utc)
    far = str(uuid.uuid4())
    near = str(uuid.uuid4())
    append_record(
        agent,
        record(far, text="far", sync_status="error", retry_count=1,
               next_attempt_at=stamp(now + dt.timedelta(days=1))),
    )
    append_record(
        agent,
        record(near, text="near", sync_status="error", retry_count=1,
               next_attempt_at=stamp(now + dt.timedelta(seconds=200))),
    )
    _, summary, _ = sync(agent, want=0)
    assert summary["created"] == 1
    jobs = by_id(agent)
    assert jobs[far]["sync_status"] == "synced"
    assert jobs[near]["sync_status"] == "error", "a wait within the legit range is honoured"


# ---- -v: one line per job ---------------------------------------------------------------------


def test_verbose_sync_prints_one_line_per_job_it_touches(agent, srv):
    a = create(agent, "a")
    b = create(agent, "b")
    proc = agent("-v", "sync")
    assert proc.returncode == 0, proc.stderr
    assert f"created {a}" in proc.stderr and f"created {b}" in proc.stderr
    pulled = srv.server_create(text="from elsewhere")
    agent("update", a, "--text", "a2", check=True)
    srv.server_delete(srv.job_by_local_id(b)["id"])
    proc = agent("-v", "sync")
    assert proc.returncode == 0, proc.stderr
    assert f"updated {a}: text" in proc.stderr
    assert f"removed {b}" in proc.stderr
    assert "pulled " in proc.stderr
    assert pulled["id"] in {j["server_id"] for j in agent.jobs()}
    quiet = agent("sync")
    assert "created" not in quiet.stderr and "pulled" not in quiet.stderr
