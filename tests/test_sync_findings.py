"""Histories the hypothesis state machine (test_sync_model.py) found to break a promise of the
contract, each kept as a plain test of its minimal example. In process: `run_pass` with the real
HTTP client against the fault server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobsyncd.jobs import create_job, delete_job
from jobsyncd.remote import Remote
from jobsyncd.store import Store, prepare_data_dir
from jobsyncd.sync import Policy, run_pass

POLICY = Policy(max_retries=3, backoff_base_seconds=0)


class Agent:
    def __init__(self, server, data: Path) -> None:
        self.store = Store(prepare_data_dir(str(data)))
        self.remote = Remote(server.url + "/api/v1", timeout=5)
        self.pull_state: dict = {}

    def sync(self):
        return run_pass(self.store, self.remote, POLICY, pull_state=self.pull_state)


@pytest.fixture
def agent(fault_server, tmp_path: Path) -> Iterator[Agent]:
    one = Agent(fault_server, tmp_path / "data")
    try:
        yield one
    finally:
        one.remote.close()


def test_a_restore_to_a_backup_older_than_every_job_creates_them_again_from_an_empty_feed(
    fault_server, agent
):
    fault_server.feed = True
    empty = fault_server.backup()
    job = create_job(agent.store, "dictation", None, {})
    assert agent.sync().created == 1
    fault_server.restore(empty, new_history=True)  # the feed now holds no change at all
    summary = agent.sync()
    assert summary.reuploaded == 1, summary
    assert agent.sync().created == 1
    assert [j["local_id"] for j in fault_server.jobs.values()] == [job.local_id]


@pytest.mark.parametrize(
    "answer", [{"garbage": True}, {"content_type": "text/html"}], ids=["junk", "captive portal"]
)
def test_a_delete_answered_200_with_something_that_is_not_the_servers_json_is_not_done(
    fault_server, agent, answer
):
    job = create_job(agent.store, "dictation", None, {})
    assert agent.sync().created == 1
    fault_server.add_fault("DELETE", r"/api/v1/jobs/.+", times=1, **answer)
    delete_job(agent.store, job.local_id)
    first = agent.sync()
    assert first.errors == 1 and first.deleted_remote == 0, first
    assert agent.store.refresh()[job.local_id].sync_status == "pending_deletion"
    assert len(fault_server.jobs) == 1  # still there: the job must not go here either
    assert agent.sync().deleted_remote == 1
    assert fault_server.jobs == {} and agent.store.refresh() == {}
