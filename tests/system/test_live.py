"""The daemon's live long-poll on the change feed (contract section 5): a server-side change
reaches the agent long before the next interval pass; `live = false` turns it off; SIGTERM stops
the daemon promptly with a long-poll open; a server that answers a long-poll at once is not
polled in a busy loop; `status --json` says how the pull reads the server.

Real `jobsyncd daemon` processes against the fault server with its `/changes` on. The interval
is 60 s, so anything that arrives within the poll deadlines below came through the long-poll.
"""

from __future__ import annotations

import json
import time

import pytest
import test_daemon
from helpers import poll

pytestmark = pytest.mark.timeout(90)

daemons = test_daemon.daemons


@pytest.fixture
def served(cli, fault_server):
    fault_server.feed = True
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    return fault_server


def long_polls(srv) -> int:
    return sum(1 for m, p, _ in srv.requests if p.startswith("/api/v1/changes") and "wait=" in p)


def local_text(cli, local_id: str) -> str | None:
    proc = cli("show", local_id, "--json")
    return json.loads(proc.stdout)["text"] if proc.returncode == 0 else None


def test_a_server_side_change_reaches_the_agent_through_the_long_poll(cli, served, daemons):
    lid = cli("create", "--text", "first", check=True).stdout.strip()
    d = daemons(interval="60")
    poll(lambda: served.job_by_local_id(lid), 15, "the create on the server")
    poll(lambda: long_polls(served) >= 1, 15, "a long-poll held by the idle daemon")
    served.server_edit(served.job_by_local_id(lid)["id"], text="changed there", status="done")
    poll(lambda: local_text(cli, lid) == "changed there", 15, "the change pulled at once")
    assert cli.json("show", lid)["server_status"] == "done"
    assert d.proc.poll() is None


def test_a_server_side_delete_reaches_the_agent_through_the_long_poll(cli, served, daemons):
    keep = cli("create", "--text", "keep", check=True).stdout.strip()
    gone = cli("create", "--text", "gone", check=True).stdout.strip()
    daemons(interval="60")
    poll(lambda: served.job_by_local_id(gone), 15, "the creates on the server")
    poll(lambda: long_polls(served) >= 1, 15, "a long-poll")
    served.server_delete(served.job_by_local_id(gone)["id"])
    poll(lambda: cli("show", gone).returncode == 1, 15, "the job removed here at once")
    assert cli("show", keep).returncode == 0


def test_live_false_holds_no_long_poll(cli, served, daemons):
    cli.env["JOBSYNCD_LIVE"] = "false"
    cli("create", "--text", "x", check=True)
    d = daemons(interval="1")
    d.wait_passes(3, timeout=20)
    assert long_polls(served) == 0


def test_sigterm_stops_the_daemon_promptly_with_a_long_poll_open(cli, served, daemons):
    cli("create", "--text", "x", check=True)
    d = daemons(interval="60")
    poll(lambda: long_polls(served) >= 1, 15, "a long-poll in flight")
    started = time.monotonic()
    assert d.stop(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert not (cli.data_dir / "daemon.pid").exists()


def test_a_server_that_answers_the_long_poll_at_once_is_not_polled_in_a_busy_loop(
    cli, served, daemons
):
    cli.env["JOBSYNCD_BACKOFF_BASE_SECONDS"] = "1"
    served.feed_ignore_wait = True
    cli("create", "--text", "x", check=True)
    daemons(interval="60")
    poll(lambda: long_polls(served) >= 1, 15, "a first long-poll")
    first = long_polls(served)
    time.sleep(3)  # the point is what does NOT happen in this time: no bounded poll fits
    assert long_polls(served) - first <= 5, "a busy loop of long-polls"


def test_status_json_reports_the_feed_mode_and_checkpoint_age(cli, served):
    cli("create", "--text", "x", check=True)
    before = cli.json("status")
    assert before["feed"] == {"mode": "unknown", "checkpoint_age_seconds": None}
    cli("sync", check=True)
    feed = cli.json("status")["feed"]
    assert feed["mode"] == "feed" and 0 <= feed["checkpoint_age_seconds"] < 60
    served.feed = False
    state = cli.data_dir / "pull_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "feed"}))
    cli("sync", check=True)
    assert cli.json("status")["feed"]["mode"] == "listing"


def test_the_daemons_own_push_coming_back_on_the_feed_runs_no_second_pass(cli, served, daemons):
    """The long-poll open while the daemon pushes a create is answered by that very create; the
    pass has already moved the checkpoint past it, so the daemon polls again from there instead
    of running a pass for nothing (each create used to cost two passes)."""
    cli("create", "--text", "first", check=True)
    daemons(interval="60")
    poll(lambda: long_polls(served) >= 1, 15, "a long-poll held by the idle daemon")
    before = len(served.requests)
    lid = cli("create", "--text", "second", check=True).stdout.strip()
    poll(lambda: served.job_by_local_id(lid), 15, "the create on the server")
    since_create = lambda: served.requests[before:]  # noqa: E731
    poll(
        lambda: any("wait=" in p for _, p, _ in since_create()),
        15,
        "a long-poll opened again after the create",
    )
    upto_poll = []
    for method, path, _ in since_create():
        if "wait=" in path:
            break
        upto_poll.append((method, path.split("?")[0]))
    assert ("POST", "/api/v1/jobs") in upto_poll or ("POST", "/api/v1/batch") in upto_poll
    assert upto_poll.count(("GET", "/api/v1/changes")) == 1, upto_poll
