"""A server restored from a backup never costs an agent a job (contract 6.7), on both engines:
two real agents sync with the real reference server; the server is backed up; both agents create
more jobs and sync; the server is stopped, restored (with and without `new-history`) and started
again; after their next passes every job of both agents is on the server again, once.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Cli
from serverproc import RunningServer
from test_changes import Backup, new_history

pytestmark = pytest.mark.timeout(180)


def agent(jobsyncd_bin: str, tmp_path: Path, name: str) -> Cli:
    home = tmp_path / f"home-{name}"
    home.mkdir()
    cli = Cli(jobsyncd_bin, tmp_path / f"data-{name}", home)
    return cli


def sync_until_ok(cli: Cli, url: str, passes: int = 3) -> None:
    cli.env["JOBSYNCD_SERVER_URL"] = url
    for _ in range(passes):
        proc = cli("sync", "--json")
        assert "Traceback" not in proc.stderr
        if proc.returncode == 0:
            continue
        assert proc.returncode == 1, proc.stderr
    assert cli("sync").returncode == 0


@pytest.mark.parametrize("with_new_history", [True, False], ids=["new-history", "no-new-history"])
def test_every_job_of_two_agents_is_back_on_a_restored_server(
    server_factory: Callable[..., RunningServer],
    jobsyncd_bin: str,
    tmp_path: Path,
    with_new_history: bool,
) -> None:
    agents = [agent(jobsyncd_bin, tmp_path, n) for n in ("a", "b")]
    server = server_factory()
    mine: dict[str, list[str]] = {"a": [], "b": []}
    for name, cli in zip("ab", agents, strict=True):
        for i in range(3):
            mine[name].append(cli("create", "--text", f"{name} before {i}", check=True).stdout.strip())
        sync_until_ok(cli, server.url)
    assert server.stop() == 0
    backup = Backup(server)
    server = server_factory()
    for name, cli in zip("ab", agents, strict=True):
        for i in range(4):
            mine[name].append(cli("create", "--text", f"{name} after {i}", check=True).stdout.strip())
        sync_until_ok(cli, server.url)
    assert server.stop() == 0
    backup.restore()
    if with_new_history:
        assert new_history(server).returncode == 0
    server = server_factory()
    for cli in agents:
        sync_until_ok(cli, server.url)
    with server.session() as client:
        listed, cursor = [], None
        for _ in range(100):
            page = client.get(server.jobs_url, params={"cursor": cursor} if cursor else {}).json()
            listed += page["jobs"]
            cursor = page["next_cursor"]
            if not cursor:
                break
    counts = collections.Counter(j["local_id"] for j in listed)
    expected = sorted(mine["a"] + mine["b"])
    assert sorted(counts) == expected, "a job of an agent is missing on the restored server"
    assert max(counts.values()) == 1, "a job is on the server twice"
    for cli, name in zip(agents, "ab", strict=True):
        local = {j["local_id"]: j for j in cli.jobs()}
        assert set(mine[name]) <= set(local)
        assert all(j["sync_status"] == "synced" for j in local.values())
