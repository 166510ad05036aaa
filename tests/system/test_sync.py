"""Black-box tests of `jobsyncd sync --json` (contract section 6) against the in-process fault server.

Each test runs the installed `jobsyncd` with a private data dir, points it at a FaultServer on
127.0.0.1 and checks the pass summary, the exit code, the local jobs and the server's state.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import poll

pytestmark = pytest.mark.timeout(60)

JOBS = "/api/v1/jobs"
JOB_PATH = r"/api/v1/jobs/.+"


# ---- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def srv(fault_server):
    return fault_server


@pytest.fixture
def agent(cli, srv):
    """The `cli` fixture pointed at the fault server."""
    cli.env["JOBSYNCD_SERVER_URL"] = srv.url
    cli.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = "2"
    return cli


def sync(cli, *extra: str, want: int | None = None) -> tuple[int, dict, str]:
    """Run `jobsyncd sync --json`; return (exit code, summary, stderr)."""
    proc = cli("sync", "--json", *extra)
    assert proc.stdout.strip(), f"sync printed no summary (exit {proc.returncode}): {proc.stderr}"
    summary = json.loads(proc.stdout)
    if want is not None:
        assert proc.returncode == want, (
            f"sync -> {proc.returncode}, want {want}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.returncode, summary, proc.stderr


def create(
    cli, text: str | None = None, audio: Path | None = None, meta: tuple[str, ...] = ()
) -> str:
    args = ["create"]
    if text is not None:
        args += ["--text", text]
    if audio is not None:
        args += ["--audio", str(audio)]
    for pair in meta:
        args += ["--meta", pair]
    return cli(*args, check=True).stdout.strip()


def show(cli, local_id: str) -> dict:
    return cli.json("show", local_id)


def by_id(cli) -> dict[str, dict]:
    return {j["local_id"]: j for j in cli.jobs()}


def audio_file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def listing_requests(srv) -> list:
    return [r for r in srv.requests if r[0] == "GET" and r[1].split("?", 1)[0] == JOBS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ZERO = {
    "created": 0,
    "updated": 0,
    "deleted_remote": 0,
    "deleted_locally": 0,
    "pulled": 0,
    "reuploaded": 0,
    "errors": 0,
    "failed": 0,
}
SUMMARY_KEYS = {"ok", *ZERO, "skipped", "deletion_guard", "handed_to_daemon"}


def bulk_create(cli, count: int) -> None:
    """Write `count` pending jobs in-process (jobsyncd.jobs.create_job), fast."""
    script = textwrap.dedent(
        """
        import sys
        from jobsyncd.store import Store, prepare_data_dir
        from jobsyncd.jobs import create_job
        store = Store(prepare_data_dir(sys.argv[1]))
        for i in range(int(sys.argv[2])):
            create_job(store, f"bulk {i}", None, {"n": i})
        """
    )
    subprocess.run(
        [sys.executable, "-c", script, str(cli.data_dir), str(count)], check=True, timeout=60
    )


# ---- 6.3 push: creates ------------------------------------------------------------------------


def test_a_pending_job_without_audio_is_created_with_a_json_post_and_becomes_synced(agent, srv):
    lid = create(agent, "hello", meta=("n=3", "who=me"))
    code, summary, _ = sync(agent, want=0)
    assert set(summary) == SUMMARY_KEYS
    assert summary == {
        **summary,
        "ok": True,
        "created": 1,
        "skipped": None,
        "deletion_guard": False,
        "handed_to_daemon": None,
    }
    (server_job,) = srv.snapshot()
    assert (server_job["local_id"], server_job["text"], server_job["metadata"]) == (
        lid,
        "hello",
        {"n": 3, "who": "me"},
    )
    (post,) = [r for r in srv.requests if r[0] == "POST"]
    assert post[2]["Content-Type"].startswith("application/json")
    job = show(agent, lid)
    assert job["sync_status"] == "synced"
    assert job["server_id"] == server_job["id"]
    assert job["server_status"] == "submitted"
    assert (job["retry_count"], job["last_error"]) == (0, None)
    assert job["last_sync_attempt_at"].endswith("Z")


def test_a_pending_job_with_audio_is_created_with_a_multipart_post_carrying_the_audio_bytes(
    agent, srv, tmp_path
):
    content = os.urandom(50_000)
    src = audio_file(tmp_path, "take1.wav", content)
    lid = create(agent, "dictation", audio=src, meta=("k=v",))
    sync(agent, want=0)
    (server_job,) = srv.snapshot()
    assert srv.audio_bytes(server_job["id"]) == content
    assert server_job["metadata"] == {"k": "v"}
    assert server_job["local_id"] == lid
    (post,) = [r for r in srv.requests if r[0] == "POST"]
    assert post[2]["Content-Type"].startswith("multipart/form-data")
    assert src.read_bytes() == content, "the user's file is never moved or changed"
    assert show(agent, lid)["sync_status"] == "synced"


# ---- 6.3 push: updates ------------------------------------------------------------------------


def test_an_update_patches_only_the_changed_fields(agent, srv):
    lid = create(agent, "first", meta=("a=1",))
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    agent("update", lid, "--text", "second", check=True)
    assert show(agent, lid)["sync_status"] == "pending"
    # Another client changes the metadata on the server: a PATCH that carried the unchanged
    # metadata too would overwrite it.
    srv.server_edit(sid, metadata={"a": 1, "from_server": True})
    srv.clear_requests()
    code, summary, _ = sync(agent, want=0)
    assert summary["updated"] == 1
    assert [r[0] for r in srv.requests if r[0] != "GET"] == ["PATCH"]
    patch = next(r for r in srv.requests if r[0] == "PATCH")
    assert patch[1] == f"{JOBS}/{sid}"
    assert patch[2]["Content-Type"].startswith("application/json")
    server_job = srv.job(sid)
    assert server_job["text"] == "second"
    assert server_job["metadata"] == {"a": 1, "from_server": True}, (
        "the unchanged metadata was sent"
    )
    # The PATCH succeeded: the job is synced, and for the fields not changed here the server's
    # copy wins (a later pass must not send the old metadata back over the other client's edit).
    sync(agent, want=0)
    assert srv.job(sid)["metadata"] == {"a": 1, "from_server": True}, (
        "a later pass sent the old metadata back"
    )
    job = show(agent, lid)
    assert job["metadata"] == {"a": 1, "from_server": True}
    assert (job["sync_status"], job["text"], job["retry_count"], job["last_error"]) == (
        "synced",
        "second",
        0,
        None,
    )


def test_a_metadata_change_is_sent_as_the_whole_new_object(agent, srv):
    lid = create(agent, "t", meta=("a=1", "b=2"))
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    agent("update", lid, "--meta", "c=3", "--unset-meta", "a", check=True)
    sync(agent, want=0)
    assert srv.job(sid)["metadata"] == {"b": 2, "c": 3}
    assert srv.job(sid)["text"] == "t"


def test_a_changed_audio_is_sent_as_a_multipart_patch(agent, srv, tmp_path):
    lid = create(agent, "with audio", audio=audio_file(tmp_path, "a.wav", b"old audio"))
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    agent(
        "update", lid, "--audio", str(audio_file(tmp_path, "b.wav", b"new audio bytes")), check=True
    )
    srv.clear_requests()
    sync(agent, want=0)
    (patch,) = [r for r in srv.requests if r[0] == "PATCH"]
    assert patch[2]["Content-Type"].startswith("multipart/form-data")
    assert srv.audio_bytes(sid) == b"new audio bytes"
    assert show(agent, lid)["sync_status"] == "synced"


def test_a_patch_answered_404_fails_the_job_as_gone_and_retry_creates_it_again(agent, srv):
    lid = create(agent, "orig")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    srv.server_delete(sid)
    agent("update", lid, "--text", "edited", check=True)
    code, summary, _ = sync(agent, want=1)
    assert (summary["ok"], summary["failed"], summary["errors"], summary["deleted_locally"]) == (
        False,
        1,
        0,
        0,
    )
    job = show(agent, lid)
    assert job["sync_status"] == "failed"
    assert "gone" in job["last_error"].lower()
    assert job["text"] == "edited"

    agent("retry", lid, check=True)
    assert show(agent, lid)["sync_status"] == "pending"
    code, summary, _ = sync(agent, want=0)
    assert summary["created"] == 1
    (server_job,) = srv.snapshot()
    assert server_job["id"] != sid
    assert (server_job["local_id"], server_job["text"]) == (lid, "edited")
    job = show(agent, lid)
    assert (job["sync_status"], job["server_id"], job["retry_count"], job["last_error"]) == (
        "synced",
        server_job["id"],
        0,
        None,
    )


# ---- 6.3 push: deletes ------------------------------------------------------------------------


def test_a_deleted_synced_job_is_deleted_on_the_server_and_its_record_and_audio_go(
    agent, srv, tmp_path
):
    lid = create(agent, "bye", audio=audio_file(tmp_path, "bye.wav", b"bye bytes"))
    keep = create(agent, "stays")
    sync(agent, want=0)
    job = show(agent, lid)
    managed = Path(job["audio_file"])
    assert managed.exists()
    agent("delete", lid, check=True)
    assert show(agent, lid)["sync_status"] == "pending_deletion"
    code, summary, _ = sync(agent, want=0)
    assert summary["deleted_remote"] == 1
    assert [r[1] for r in srv.requests if r[0] == "DELETE"] == [f"{JOBS}/{job['server_id']}"]
    assert srv.job(job["server_id"]) is None
    assert agent("show", lid).returncode == 1
    assert not managed.exists()
    assert set(by_id(agent)) == {keep}


def test_a_delete_answered_404_counts_as_done(agent, srv):
    lid = create(agent, "x")
    sync(agent, want=0)
    srv.server_delete(show(agent, lid)["server_id"])
    agent("delete", lid, check=True)
    code, summary, _ = sync(agent, want=0)
    assert summary["deleted_remote"] == 1
    assert summary["errors"] == summary["failed"] == 0
    assert agent.jobs() == []


def test_a_deleted_job_that_never_reached_the_server_just_goes(agent, srv, tmp_path):
    lid = create(agent, "never sent", audio=audio_file(tmp_path, "n.wav", b"nope"))
    managed = Path(show(agent, lid)["audio_file"])
    agent("delete", lid, check=True)
    code, summary, _ = sync(agent, want=0)
    assert summary["deleted_remote"] == 0
    assert [r for r in srv.requests if r[0] in ("POST", "DELETE", "PATCH")] == []
    assert agent.jobs() == []
    assert not managed.exists()
    assert srv.snapshot() == []


def test_a_deletion_that_errors_stays_pending_deletion_and_is_retried_as_a_deletion(agent, srv):
    lid = create(agent, "hard to kill")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    agent("delete", lid, check=True)
    srv.add_fault("DELETE", JOB_PATH, status=500)
    code, summary, _ = sync(agent, want=1)
    assert (summary["errors"], summary["deleted_remote"]) == (1, 0)
    job = show(agent, lid)
    assert job["sync_status"] == "pending_deletion"
    assert job["retry_count"] == 1
    assert job["last_error"]
    assert job["last_sync_attempt_at"]
    code, summary, _ = sync(agent, want=0)
    assert summary["deleted_remote"] == 1
    assert srv.job(sid) is None
    assert agent.jobs() == []


# ---- 6.1 offline and TLS ----------------------------------------------------------------------


def test_a_day_offline_skips_every_pass_and_fails_no_job(agent):
    agent.env["JOBSYNCD_SERVER_URL"] = f"http://127.0.0.1:{free_port()}"
    agent.env["JOBSYNCD_MAX_RETRIES"] = "2"
    lids = [create(agent, f"offline {i}") for i in range(2)]
    before = by_id(agent)
    for _ in range(10):
        code, summary, stderr = sync(agent, want=75)
        assert summary == {**summary, **ZERO, "ok": False, "skipped": "offline"}
        assert "jobsyncd: error:" in stderr
    after = by_id(agent)
    for lid in lids:
        assert after[lid]["sync_status"] == "pending"
        assert after[lid]["retry_count"] == before[lid]["retry_count"] == 0
        assert after[lid]["last_error"] is None


def test_a_tls_failure_stops_the_pass_with_exit_1_and_skipped_tls(agent, srv):
    agent.env["JOBSYNCD_SERVER_URL"] = srv.url.replace("http://", "https://")
    lid = create(agent, "tls")
    code, summary, stderr = sync(agent, want=1)
    assert summary == {**summary, **ZERO, "ok": False, "skipped": "tls"}
    assert "jobsyncd: error:" in stderr and "tls" in stderr.lower()
    job = show(agent, lid)
    assert (job["sync_status"], job["retry_count"]) == ("pending", 0)
    assert srv.snapshot() == []


# ---- 6.2 auth and back-off --------------------------------------------------------------------


def test_refused_credentials_stop_the_pass_with_exit_77_and_count_no_job(agent):
    from faultserver import FaultServer

    with FaultServer(token="the-right-token") as guarded:
        agent.env["JOBSYNCD_SERVER_URL"] = guarded.url
        agent.env["JOBSYNCD_TOKEN"] = "a-wrong-token"
        lid = create(agent, "auth")
        code, summary, stderr = sync(agent, want=77)
        assert summary == {**summary, **ZERO, "ok": False, "skipped": "auth"}
        assert "a-wrong-token" not in stderr
        job = show(agent, lid)
        assert (job["sync_status"], job["retry_count"], job["last_error"]) == ("pending", 0, None)
        assert guarded.snapshot() == []
        # The right token works.
        agent.env["JOBSYNCD_TOKEN"] = "the-right-token"
        sync(agent, want=0)
        assert len(guarded.snapshot()) == 1


def test_a_403_also_stops_the_pass_as_auth(agent, srv):
    create(agent, "forbidden")
    srv.add_fault("POST", JOBS, status=403)
    code, summary, _ = sync(agent, want=77)
    assert summary == {**summary, **ZERO, "skipped": "auth", "ok": False}


def test_a_429_stops_the_pass_and_a_sync_inside_the_window_does_not_contact_the_server(agent, srv):
    lid = create(agent, "busy")
    srv.add_fault("POST", JOBS, status=429, headers={"Retry-After": "120"})
    code, summary, stderr = sync(agent, want=75)
    assert summary == {**summary, **ZERO, "ok": False, "skipped": "backoff"}
    job = show(agent, lid)
    assert (job["sync_status"], job["retry_count"]) == ("pending", 0)
    seen = srv.count()
    code, summary, _ = sync(agent, want=75)
    assert summary == {**summary, **ZERO, "ok": False, "skipped": "backoff"}
    assert srv.count() == seen, "a sync inside the back-off window contacted the server"
    assert srv.snapshot() == []


def test_a_503_during_the_pull_stops_the_pass_as_backoff(agent, srv):
    create(agent, "x")
    srv.add_fault("GET", JOBS, status=503, headers={"Retry-After": "60"})
    code, summary, _ = sync(agent, want=75)
    assert summary["skipped"] == "backoff"
    seen = srv.count()
    sync(agent, want=75)
    assert srv.count() == seen


# ---- 6.3 errors and failures ------------------------------------------------------------------


def test_a_server_error_counts_a_retry_and_max_retries_fails_the_job(agent, srv):
    agent.env["JOBSYNCD_MAX_RETRIES"] = "2"
    lid = create(agent, "unlucky")
    srv.add_fault("POST", JOBS, times=None, status=500)
    code, summary, stderr = sync(agent, want=1)
    assert (summary["ok"], summary["errors"], summary["failed"], summary["created"]) == (
        False,
        1,
        0,
        0,
    )
    assert srv.count("POST") == 1, "a job is attempted at most once per pass"
    job = show(agent, lid)
    assert (job["sync_status"], job["retry_count"]) == ("error", 1)
    assert "500" in job["last_error"]
    assert job["last_sync_attempt_at"]
    code, summary, _ = sync(agent, want=1)
    assert (summary["errors"], summary["failed"]) == (0, 1)
    job = show(agent, lid)
    assert (job["sync_status"], job["retry_count"]) == ("failed", 2)
    # A failed job is never tried again until `retry`.
    posts = srv.count("POST")
    sync(agent, want=0)
    assert srv.count("POST") == posts
    srv.clear_faults()
    agent("retry", lid, check=True)
    code, summary, _ = sync(agent, want=0)
    assert summary["created"] == 1
    job = show(agent, lid)
    assert (job["sync_status"], job["retry_count"], job["last_error"]) == ("synced", 0, None)


def test_an_errored_job_is_not_tried_again_before_its_backoff_is_due(agent, srv):
    agent.env["JOBSYNCD_BACKOFF_BASE_SECONDS"] = "3600"
    lid = create(agent, "later")
    srv.add_fault("POST", JOBS, status=502)
    sync(agent, want=1)
    assert show(agent, lid)["sync_status"] == "error"
    code, summary, _ = sync(agent, want=0)
    assert srv.count("POST") == 1
    job = show(agent, lid)
    assert (job["sync_status"], job["retry_count"]) == ("error", 1)
    assert srv.snapshot() == []


def test_a_422_fails_the_job_at_once_with_the_servers_message_and_the_other_jobs_still_sync(
    agent, srv
):
    bad = create(agent, "bad")
    good = create(agent, "good")
    srv.add_fault("POST", JOBS, status=422, body={"error": "text is not acceptable to the server"})
    code, summary, _ = sync(agent, want=1)
    assert (summary["failed"], summary["errors"], summary["created"]) == (1, 0, 1)
    job = show(agent, bad)
    assert job["sync_status"] == "failed"
    assert "text is not acceptable to the server" in job["last_error"]
    assert show(agent, good)["sync_status"] == "synced"
    assert [j["local_id"] for j in srv.snapshot()] == [good]


@pytest.mark.parametrize(
    "fault",
    [{"garbage": True}, {"content_type": "text/html"}, {"status": 200, "body": {"not": "a job"}}],
    ids=["garbage", "html", "json-without-id"],
)
def test_an_answer_that_is_not_the_expected_json_is_an_error(agent, srv, fault):
    lid = create(agent, "junk")
    srv.add_fault("POST", JOBS, **fault)
    code, summary, _ = sync(agent, want=1)
    assert (summary["errors"], summary["failed"], summary["created"]) == (1, 0, 0)
    job = show(agent, lid)
    assert (job["sync_status"], job["retry_count"]) == ("error", 1)
    assert job["last_error"]


def test_a_read_timeout_is_an_error_not_offline(agent, srv):
    agent.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = "0.5"
    lid = create(agent, "slow")
    srv.add_fault("POST", JOBS, delay=3)
    code, summary, _ = sync(agent, want=1)
    assert (summary["skipped"], summary["errors"]) == (None, 1)
    assert show(agent, lid)["retry_count"] == 1


# ---- 6.4 pull ---------------------------------------------------------------------------------


def test_server_edits_win_for_synced_jobs(agent, srv):
    lid = create(agent, "mine", meta=("a=1",))
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    srv.server_edit(sid, text="theirs", metadata={"b": 2}, status="transcribed")
    code, summary, _ = sync(agent, want=0)
    assert summary["pulled"] == 1
    job = show(agent, lid)
    assert (job["text"], job["metadata"], job["server_status"], job["sync_status"]) == (
        "theirs",
        {"b": 2},
        "transcribed",
        "synced",
    )
    assert [r[0] for r in srv.requests if r[0] in ("POST", "PATCH")] == ["POST"], (
        "the pulled copy was pushed back"
    )


def test_server_created_jobs_are_added_as_synced_without_audio(agent, srv):
    theirs = str(uuid.uuid4())
    a = srv.server_create(
        local_id=theirs, text=None, metadata={"src": "web"}, audio=b"server audio", status="done"
    )
    b = srv.server_create(local_id="not-a-uuid", text="odd id")
    code, summary, _ = sync(agent, want=0)
    assert summary["pulled"] == 2
    jobs = {j["server_id"]: j for j in agent.jobs()}
    ja, jb = jobs[a["id"]], jobs[b["id"]]
    assert ja["local_id"] == theirs
    assert (
        ja["text"],
        ja["metadata"],
        ja["server_status"],
        ja["sync_status"],
        ja["audio_file"],
    ) == ("", {"src": "web"}, "done", "synced", None)
    assert uuid.UUID(jb["local_id"]).version == 4
    assert (jb["text"], jb["sync_status"], jb["audio_file"]) == ("odd id", "synced", None)
    assert not (agent.data_dir / "audio").exists() or not list(
        (agent.data_dir / "audio").iterdir()
    ), "audio was downloaded"
    # The next pass pushes nothing back.
    srv.clear_requests()
    sync(agent, want=0)
    assert [r for r in srv.requests if r[0] != "GET"] == []


def test_a_server_job_whose_local_id_is_used_here_gets_a_new_uuid(agent, srv):
    lid = create(agent, "local")
    sync(agent, want=0)
    other = srv.server_create(local_id=lid, text="another client's job with our local_id")
    sync(agent, want=0)
    jobs = by_id(agent)
    assert len(jobs) == 2
    assert jobs[lid]["text"] == "local"
    (new,) = [j for j in jobs.values() if j["local_id"] != lid]
    assert new["server_id"] == other["id"]
    assert uuid.UUID(new["local_id"]).version == 4


def test_the_pull_never_overwrites_or_removes_jobs_that_are_not_synced(agent, srv):
    agent.env["JOBSYNCD_MAX_RETRIES"] = "5"
    edited = create(agent, "edited here")
    failing = create(agent, "failed here")
    removed = create(agent, "removed on the server")
    sync(agent, want=0)
    sids = {lid: show(agent, lid)["server_id"] for lid in (edited, failing, removed)}
    agent("update", edited, "--text", "local edit", check=True)
    agent("update", failing, "--text", "local edit 2", check=True)
    agent("update", removed, "--text", "local edit 3", check=True)
    srv.server_edit(sids[edited], text="server edit")
    srv.server_edit(sids[failing], text="server edit 2")
    srv.add_fault("PATCH", f"{JOBS}/{sids[edited]}", status=500)
    srv.add_fault("PATCH", f"{JOBS}/{sids[failing]}", status=400, body={"error": "nope"})
    srv.add_fault("PATCH", f"{JOBS}/{sids[removed]}", status=502)
    srv.server_delete(sids[removed])
    code, summary, _ = sync(agent, want=1)
    assert (summary["pulled"], summary["deleted_locally"]) == (0, 0)
    jobs = by_id(agent)
    assert (jobs[edited]["text"], jobs[edited]["sync_status"]) == ("local edit", "error")
    assert (jobs[failing]["text"], jobs[failing]["sync_status"]) == ("local edit 2", "failed")
    assert (jobs[removed]["text"], jobs[removed]["sync_status"]) == ("local edit 3", "error")
    # Once the push goes through, the local edit reaches the server.
    sync(agent)
    assert srv.job(sids[edited])["text"] == "local edit"
    assert show(agent, edited)["sync_status"] == "synced"


def test_a_listing_that_fails_on_page_2_removes_no_job_and_exits_1(agent, srv):
    lids = [create(agent, f"paged {i}") for i in range(5)]
    sync(agent, want=0)
    srv.listing_limit = 2
    first = show(agent, lids[0])["server_id"]
    srv.server_delete(first)
    srv.add_fault("GET", JOBS, fail_page=2)
    code, summary, stderr = sync(agent, want=1)
    assert (summary["ok"], summary["deleted_locally"], summary["deletion_guard"]) == (
        False,
        0,
        False,
    )
    assert set(by_id(agent)) == set(lids)
    assert [r for r in srv.requests if r[0] == "GET" and r[1].startswith(f"{JOBS}/")] == []
    # With a complete listing, the server-side delete is taken.
    code, summary, _ = sync(agent, want=0)
    assert summary["deleted_locally"] == 1
    assert set(by_id(agent)) == set(lids[1:])


def test_a_job_deleted_on_the_server_is_confirmed_by_a_get_and_removed_here_with_its_audio(
    agent, srv, tmp_path
):
    gone = create(agent, "gone", audio=audio_file(tmp_path, "g.wav", b"gone audio"))
    keep = [create(agent, f"keep {i}") for i in range(2)]
    sync(agent, want=0)
    job = show(agent, gone)
    managed = Path(job["audio_file"])
    assert managed.exists()
    srv.server_delete(job["server_id"])
    srv.clear_requests()
    code, summary, _ = sync(agent, want=0)
    assert summary["deleted_locally"] == 1
    assert srv.count("GET", f"{JOBS}/{job['server_id']}") == 1
    assert set(by_id(agent)) == set(keep)
    assert not managed.exists()


def test_a_job_missing_from_the_listing_but_found_by_get_is_kept(agent, srv):
    lid = create(agent, "still there")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    srv.server_edit(sid, text="changed meanwhile")  # new ETag: the listing is read again
    srv.add_fault("GET", JOBS, empty_listing=True)
    code, summary, _ = sync(agent, want=0)
    assert (summary["deleted_locally"], summary["pulled"]) == (0, 1)
    assert srv.count("GET", f"{JOBS}/{sid}") == 1
    job = show(agent, lid)
    assert (job["sync_status"], job["text"]) == ("synced", "changed meanwhile")


def test_a_confirming_get_that_errors_keeps_the_job_and_makes_the_pass_not_ok(agent, srv):
    lid = create(agent, "unsure")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    srv.server_delete(sid)
    srv.add_fault("GET", JOB_PATH, status=500)
    code, summary, _ = sync(agent, want=1)
    assert (summary["ok"], summary["deleted_locally"]) == (False, 0)
    assert show(agent, lid)["sync_status"] == "synced"


@pytest.mark.parametrize(
    ("status", "skipped", "exit_code"),
    [(429, "backoff", 75), (503, "backoff", 75), (401, "auth", 77), (403, "auth", 77)],
)
def test_a_confirming_get_refused_or_throttled_stops_the_pass(
    agent, srv, status, skipped, exit_code
):
    lid = create(agent, "confirm me")
    sync(agent, want=0)
    srv.server_delete(show(agent, lid)["server_id"])
    srv.add_fault("GET", JOB_PATH, status=status, headers={"Retry-After": "60"})
    code, summary, _ = sync(agent, want=exit_code)
    assert (summary["skipped"], summary["deleted_locally"], summary["ok"]) == (skipped, 0, False)
    assert show(agent, lid)["sync_status"] == "synced"


def test_the_deletion_guard_keeps_every_job_when_the_listing_holds_none_of_them(agent, srv):
    lids = [create(agent, f"guarded {i}") for i in range(3)]
    sync(agent, want=0)
    for job in srv.snapshot():
        srv.server_delete(job["id"])
    srv.clear_requests()
    code, summary, stderr = sync(agent, want=1)
    assert (summary["ok"], summary["deletion_guard"], summary["deleted_locally"]) == (
        False,
        True,
        0,
    )
    assert "--force-delete" in stderr
    assert set(by_id(agent)) == set(lids)
    assert [r for r in srv.requests if r[1].startswith(f"{JOBS}/")] == []

    code, summary, _ = sync(agent, "--force-delete", want=0)
    assert (summary["deletion_guard"], summary["deleted_locally"]) == (False, 3)
    assert agent.jobs() == []


def test_the_deletion_guard_trips_on_an_empty_listing_answer(agent, srv):
    lids = [create(agent, f"g {i}") for i in range(2)]
    sync(agent, want=0)
    srv.server_create(text="someone else's")  # new ETag
    srv.add_fault("GET", JOBS, empty_listing=True)
    code, summary, _ = sync(agent, want=1)
    assert summary["deletion_guard"] is True
    assert set(lids) <= set(by_id(agent))


def test_a_second_pass_without_changes_makes_one_conditional_listing_request_and_gets_304(
    agent, srv
):
    create(agent, "a")
    create(agent, "b")
    sync(agent, want=0)
    srv.clear_requests()
    code, summary, _ = sync(agent, want=0)
    assert summary == {**summary, **ZERO, "ok": True}
    requests_seen = srv.requests
    assert len(requests_seen) == 1, requests_seen
    method, path, headers = requests_seen[0]
    assert (method, path.split("?", 1)[0]) == ("GET", JOBS)
    assert headers.get("If-None-Match") == srv.etag  # the server answers 304 to it


# ---- 6.6 idempotent create --------------------------------------------------------------------


def test_a_create_whose_answer_was_lost_makes_no_duplicate_on_the_server(agent, srv):
    lid = create(agent, "once")
    srv.add_fault("POST", JOBS, drop_after_store=True)
    code, summary, _ = sync(agent, want=1)
    assert summary["errors"] == 1
    assert len(srv.snapshot()) == 1
    code, summary, _ = sync(agent, want=0)
    (server_job,) = srv.snapshot()
    assert server_job["local_id"] == lid
    (job,) = agent.jobs()
    assert (job["local_id"], job["server_id"], job["sync_status"], job["retry_count"]) == (
        lid,
        server_job["id"],
        "synced",
        0,
    )


# ---- 6.5 CLI changes during a pass ------------------------------------------------------------


@pytest.fixture
def held(srv):
    """An event that holds the server's answers; released (and any process killed) at teardown."""
    event = threading.Event()
    procs: list[subprocess.Popen] = []
    yield event, procs
    event.set()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _sync_in_background(agent, procs) -> subprocess.Popen:
    proc = agent.popen("sync", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    return proc


def test_an_edit_made_while_its_patch_is_in_flight_stays_pending_and_reaches_the_server_next_pass(
    agent, srv, held
):
    event, procs = held
    lid = create(agent, "v1")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    agent("update", lid, "--text", "v2", check=True)
    srv.add_fault("PATCH", JOB_PATH, delay_event=event)
    proc = _sync_in_background(agent, procs)
    poll(lambda: srv.count("PATCH") >= 1)
    started = time.monotonic()
    agent("update", lid, "--text", "v3", check=True, timeout=10)
    assert time.monotonic() - started < 3
    assert proc.poll() is None, "the sync pass ended before the server answered"
    event.set()
    out, _ = proc.communicate(timeout=20)
    assert srv.job(sid)["text"] == "v2"
    job = show(agent, lid)
    assert (job["text"], job["sync_status"]) == ("v3", "pending")
    sync(agent, want=0)
    assert srv.job(sid)["text"] == "v3"
    assert show(agent, lid)["sync_status"] == "synced"


def test_an_edit_made_while_its_create_is_in_flight_reaches_the_server_next_pass(agent, srv, held):
    event, procs = held
    lid = create(agent, "draft")
    srv.add_fault("POST", JOBS, delay_event=event)
    proc = _sync_in_background(agent, procs)
    poll(lambda: srv.count("POST") >= 1)
    agent("update", lid, "--text", "final", "--meta", "x=1", check=True, timeout=10)
    assert proc.poll() is None
    event.set()
    proc.communicate(timeout=20)
    assert show(agent, lid)["sync_status"] == "pending"
    sync(agent, want=0)
    (server_job,) = srv.snapshot()
    assert (server_job["text"], server_job["metadata"]) == ("final", {"x": 1})
    assert show(agent, lid)["sync_status"] == "synced"


@pytest.mark.parametrize("answer_lost", [False, True], ids=["answered", "answer-lost"])
def test_a_delete_made_while_its_create_is_in_flight_ends_with_the_server_copy_deleted(
    agent, srv, held, answer_lost
):
    event, procs = held
    lid = create(agent, "short-lived")
    srv.add_fault("POST", JOBS, delay_event=event, drop_after_store=answer_lost)
    proc = _sync_in_background(agent, procs)
    poll(lambda: srv.count("POST") >= 1)
    started = time.monotonic()
    agent("delete", lid, check=True, timeout=10)
    assert time.monotonic() - started < 3
    assert proc.poll() is None, "the sync pass ended before the server answered"
    event.set()
    proc.communicate(timeout=20)
    assert len(srv.snapshot()) == 1  # the create did reach the server
    assert show(agent, lid)["sync_status"] == "pending_deletion"
    code, summary, _ = sync(agent, want=0)
    assert summary["deleted_remote"] == 1
    assert srv.snapshot() == []
    assert agent.jobs() == []


def test_a_delete_made_while_its_patch_is_in_flight_deletes_the_job_on_the_next_pass(
    agent, srv, held
):
    event, procs = held
    lid = create(agent, "a")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    agent("update", lid, "--text", "b", check=True)
    srv.add_fault("PATCH", JOB_PATH, delay_event=event)
    proc = _sync_in_background(agent, procs)
    poll(lambda: srv.count("PATCH") >= 1)
    agent("delete", lid, check=True, timeout=10)
    assert proc.poll() is None
    event.set()
    proc.communicate(timeout=20)
    assert show(agent, lid)["sync_status"] == "pending_deletion"
    sync(agent, want=0)
    assert srv.job(sid) is None
    assert agent.jobs() == []


# ---- crash safety and progress ----------------------------------------------------------------


def test_a_sync_killed_mid_push_of_500_jobs_leaves_no_duplicate_and_the_next_pass_finishes(
    agent, srv, held
):
    _, procs = held
    bulk_create(agent, 500)
    srv.add_fault("POST", JOBS, times=None, delay=0.01)
    proc = agent.popen("sync", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    poll(lambda: len(srv.jobs) >= 200 or proc.poll() is not None, timeout=30)
    assert proc.poll() is None, "the pass ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    on_server = len(srv.jobs)
    assert 200 <= on_server < 500
    srv.clear_faults()
    code, summary, stderr = sync(agent, want=0)
    assert "pushing" not in stderr
    server_jobs = srv.snapshot()
    assert len(server_jobs) == 500
    assert len({j["local_id"] for j in server_jobs}) == 500
    local = agent.jobs()
    assert len(local) == 500
    assert {j["sync_status"] for j in local} == {"synced"}
    assert {j["local_id"] for j in local} == {j["local_id"] for j in server_jobs}
    assert {j["server_id"] for j in local} == {j["id"] for j in server_jobs}


def test_no_progress_bar_is_drawn_when_stderr_is_not_a_terminal(agent, srv):
    bulk_create(agent, 60)
    proc = agent("sync")
    assert proc.returncode == 0, proc.stderr
    assert "pushing" not in proc.stderr
    assert "\r" not in proc.stderr
    assert len(srv.snapshot()) == 60
    agent("update", agent.jobs()[0]["local_id"], "--text", "x", check=True)
    proc = agent("sync", "--json")
    assert proc.returncode == 0
    assert proc.stderr == ""
    json.loads(proc.stdout)
