"""`jobsyncd sync --dry-run` (contract section 2): the actions a pass would take, one per line or
as JSON Lines with `--json`, found with GET requests only; nothing written anywhere (no store
line, no checkpoint, no back-off record, no last pass); exit 75 inside a back-off window without
a request, else as the pass would; never handed to a running daemon.

Real `jobsyncd` processes against the fault server on loopback.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
import test_daemon

daemons = test_daemon.daemons

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def served(cli, fault_server):
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    return fault_server


def snapshot(data_dir: Path) -> dict[str, tuple[str, int]]:
    """Every file under the data dir: its content hash and mtime (nothing may change)."""
    return {
        str(p.relative_to(data_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def make_one_of_each(cli, srv) -> dict[str, str]:
    """Local jobs and server changes such that a pass would do one of each action."""
    ids = {name: cli("create", "--text", name, check=True).stdout.strip() for name in
           ("edited", "deleted", "pulled", "gone", "kept")}
    cli("sync", check=True)
    ids["new"] = cli("create", "--text", "new", check=True).stdout.strip()
    cli("update", ids["edited"], "--text", "edited here", check=True)
    cli("delete", ids["deleted"], check=True)
    srv.server_edit(srv.job_by_local_id(ids["pulled"])["id"], status="done")
    srv.server_delete(srv.job_by_local_id(ids["gone"])["id"])
    return ids


def test_dry_run_prints_each_action_and_changes_nothing_here_or_there(cli, served):
    ids = make_one_of_each(cli, served)
    before = snapshot(cli.data_dir)
    seen = len(served.all_requests)
    proc = cli("sync", "--dry-run", check=0)
    lines = proc.stdout.splitlines()
    by_action = {line.split(" ", 1)[0]: line for line in lines}
    assert f"create {ids['new']}" in lines
    assert by_action["update"].startswith(f"update {ids['edited']} (server id ")
    assert by_action["update"].endswith(": text")
    assert by_action["delete"].startswith(f"delete {ids['deleted']} (server id ")
    assert by_action["pull"].startswith(f"pull {ids['pulled']} (server id ")
    assert by_action["pull"].endswith(": server_status")
    assert by_action["remove-local"].startswith(f"remove-local {ids['gone']} (server id ")
    assert len(lines) == 5, lines
    assert ids["kept"] not in proc.stdout
    assert {m for m, _, _ in served.all_requests[seen:]} == {"GET"}
    assert snapshot(cli.data_dir) == before
    # ...and the pass it described then does exactly that.
    summary = json.loads(cli("sync", "--json", check=True).stdout)
    assert (summary["created"], summary["updated"], summary["deleted_remote"]) == (1, 1, 1)
    assert (summary["pulled"], summary["deleted_locally"]) == (1, 1)


def test_dry_run_json_is_one_object_per_action_with_the_contract_keys(cli, served):
    ids = make_one_of_each(cli, served)
    proc = cli("sync", "--dry-run", "--json", check=0)
    actions = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(set(a) == {"action", "local_id", "server_id", "fields"} for a in actions)
    by_action = {a["action"]: a for a in actions}
    assert set(by_action) == {"create", "update", "delete", "pull", "remove-local"}
    assert by_action["create"] == {
        "action": "create", "local_id": ids["new"], "server_id": None, "fields": None
    }
    assert by_action["update"]["fields"] == ["text"]
    assert by_action["pull"]["fields"] == ["server_status"]
    assert by_action["remove-local"]["local_id"] == ids["gone"]
    assert by_action["delete"]["server_id"] == served.job_by_local_id(ids["deleted"])["id"]


def test_dry_run_inside_a_back_off_window_exits_75_without_a_request(cli, served):
    cli("create", "--text", "x", check=True)
    served.add_fault("GET", r"/api/v1/.*", times=1, status=503, headers={"Retry-After": "60"})
    served.add_fault("POST", r"/api/v1/.*", times=1, status=503, headers={"Retry-After": "60"})
    cli("sync", check=75)
    before, seen = snapshot(cli.data_dir), len(served.all_requests)
    proc = cli("sync", "--dry-run", check=75)
    assert proc.stderr.startswith("jobsyncd: error: the server asked to back off")
    assert len(served.all_requests) == seen
    assert snapshot(cli.data_dir) == before


def test_dry_run_against_an_unreachable_server_exits_75_and_writes_no_back_off(cli, tmp_path):
    cli.env["JOBSYNCD_SERVER_URL"] = "http://127.0.0.1:9"  # discard port: nothing listens
    cli("create", "--text", "x", check=True)
    before = snapshot(cli.data_dir)
    proc = cli("sync", "--dry-run", check=75)
    assert "create " in proc.stdout  # the push is planned from the store alone
    assert proc.stderr.startswith("jobsyncd: error: ")
    assert "Traceback" not in proc.stderr
    assert snapshot(cli.data_dir) == before


def test_dry_run_shows_the_deletion_guard_instead_of_removals(cli, served):
    ids = [cli("create", "--text", f"j{i}", check=True).stdout.strip() for i in range(3)]
    cli("sync", check=True)
    for local_id in ids:
        served.server_delete(served.job_by_local_id(local_id)["id"])
    proc = cli("sync", "--dry-run", check=1)
    assert "remove-local" not in proc.stdout
    assert "deletion guard" in proc.stderr
    forced = cli("sync", "--dry-run", "--force-delete", check=0)
    assert sorted(line.split()[1] for line in forced.stdout.splitlines()) == sorted(ids)
    assert len(cli.jobs()) == 3  # still nothing removed


def test_dry_run_is_never_handed_to_a_running_daemon(cli, served, daemons):
    cli("create", "--text", "before the daemon", check=True)
    d = daemons(interval="60")
    d.wait_passes(1, timeout=20)
    d.proc.send_signal(signal.SIGSTOP)  # a daemon that would take the pass cannot act now
    try:
        local_id = cli("create", "--text", "planned", check=True).stdout.strip()
        proc = cli("sync", "--dry-run", check=0, timeout=20)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert proc.stdout.splitlines() == [f"create {local_id}"]
    assert "daemon" not in proc.stderr
