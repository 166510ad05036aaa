"""Pages of the change feed that are larger than the agent accepts (big jobs): the pass asks for
fewer changes per page instead of failing at the same page at every pass. And the items of a page
that say what the agent holds already (a first sync reads back what it pushed): not parsed, but
still checked.

In process: `run_pass` with the real HTTP client against the fault server on loopback, with the
client's page-size limit lowered so that a few kilobytes of jobs make a page too large."""

from __future__ import annotations

from pathlib import Path

import jobsyncd.remote as remote_module
from jobsyncd.remote import Remote
from jobsyncd.store import Store, prepare_data_dir
from jobsyncd.sync import Policy, run_pass


def test_a_feed_page_too_large_is_asked_again_smaller_and_every_job_arrives(
    fault_server, tmp_path: Path, monkeypatch
):
    fault_server.feed = True
    for i in range(40):
        fault_server.server_create(text=f"{i} " + "dictated words " * 150)  # ~2 KiB each
    monkeypatch.setattr(remote_module, "MAX_PAGE_ANSWER_BYTES", 20_000)  # ~9 jobs a page
    store = Store(prepare_data_dir(str(tmp_path / "data")))
    remote = Remote(fault_server.url + "/api/v1", timeout=5)
    pull_state: dict = {}
    try:
        summary = run_pass(store, remote, Policy(3, 0), pull_state=pull_state)
    finally:
        remote.close()
    assert summary.ok, summary
    assert summary.pulled == 40
    assert len(store.load()) == 40
    limits = [p for m, p, _ in fault_server.requests if p.startswith("/api/v1/changes")]
    assert any("limit=1000" in p for p in limits) and any("limit=3" in p for p in limits)
    assert isinstance(pull_state.get("checkpoint"), str)  # the read reached the feed's end


def test_a_job_read_back_as_held_changes_nothing_but_an_invalid_timestamp_still_counts(
    fault_server, tmp_path: Path
):
    """The pull skips the full parse of a feed item equal to the job it holds, but not the
    checks: a job whose server copy keeps its text and gets a timestamp that is not RFC 3339
    is skipped with a warning, the pass is not ok, and the job stays as it is (6.4)."""
    from jobsyncd.jobs import create_job

    fault_server.feed = True
    store = Store(prepare_data_dir(str(tmp_path / "data")))
    remote = Remote(fault_server.url + "/api/v1", timeout=5)
    pull_state: dict = {}
    try:
        jobs = [create_job(store, f"job {i}", None, {"n": i}) for i in range(3)]
        first = run_pass(store, remote, Policy(3, 0), pull_state=pull_state)
        assert first.ok and first.created == 3 and first.pulled == 0, first
        held = {lid: (j.text, j.metadata, j.server_status, j.updated_at) for lid, j in store.load().items()}
        sid = store.load()[jobs[1].local_id].server_id
        fault_server.server_edit(sid, updated_at="last tuesday")
        second = run_pass(store, remote, Policy(3, 0), pull_state=pull_state)
        after = {lid: (j.text, j.metadata, j.server_status, j.updated_at) for lid, j in store.load().items()}
    finally:
        remote.close()
    assert not second.ok and second.pulled == 0, second
    assert after == held
    assert pull_state.get("checkpoint") is not None
