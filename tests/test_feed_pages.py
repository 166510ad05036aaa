"""Pages of the change feed that are larger than the agent accepts (big jobs): the pass asks for
fewer changes per page instead of failing at the same page at every pass.

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
