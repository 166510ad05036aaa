"""The core sync scenarios as one contract suite run against both server implementations.

The `server` fixture is parametrized over the in-process fault server and the real reference
server process (`jobsyncd-server`); every server-side change another client would make goes
through the HTTP API (POST, PATCH, DELETE), so each test runs unchanged against both.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from faultserver import FaultProxy, FaultServer
from helpers import Cli

pytestmark = pytest.mark.timeout(60)


class Server:
    """One server implementation, seen only through the HTTP API."""

    def __init__(self, kind: str, url: str, port: int) -> None:
        self.kind, self.url, self.port = kind, url, port
        self.api = url + "/api/v1/jobs"
        self.http = requests.Session()

    def jobs(self) -> list[dict]:
        out: list[dict] = []
        cursor = None
        for _ in range(1000):
            params: dict = {"limit": 5000}
            if cursor:
                params["cursor"] = cursor
            answer = self.http.get(self.api, params=params, timeout=10)
            assert answer.status_code == 200, answer.text
            page = answer.json()
            out += page["jobs"]
            cursor = page["next_cursor"]
            if not cursor:
                return out
        raise AssertionError("the listing did not end")

    def job(self, server_id: str) -> dict | None:
        answer = self.http.get(f"{self.api}/{server_id}", timeout=10)
        if answer.status_code == 404:
            return None
        assert answer.status_code == 200, answer.text
        return answer.json()

    def create(self, **fields) -> dict:
        answer = self.http.post(self.api, json=fields, timeout=10)
        assert answer.status_code == 201, answer.text
        return answer.json()

    def edit(self, server_id: str, **fields) -> dict:
        answer = self.http.patch(f"{self.api}/{server_id}", json=fields, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def delete(self, server_id: str) -> None:
        answer = self.http.delete(f"{self.api}/{server_id}", timeout=10)
        assert answer.status_code == 204, answer.text


@pytest.fixture(params=["fault", "ref"])
def server(request) -> Iterator[Server]:
    if request.param == "fault":
        with FaultServer() as srv:
            # The same offers as the reference server: the change feed and batches.
            srv.feed = srv.batch = True
            yield Server("fault", srv.url, srv.port)
    else:
        ref = request.getfixturevalue("ref_server")
        yield Server("ref", ref.url, ref.port)


@pytest.fixture
def agent(cli: Cli, server: Server) -> Cli:
    cli.env["JOBSYNCD_SERVER_URL"] = server.url
    cli.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = "2"
    return cli


def sync(cli: Cli, *extra: str, want: int | None = None) -> dict:
    proc = cli("sync", "--json", *extra)
    assert proc.stdout.strip(), f"sync printed no summary (exit {proc.returncode}): {proc.stderr}"
    if want is not None:
        assert proc.returncode == want, (
            f"sync -> {proc.returncode}, want {want}\n{proc.stdout}\n{proc.stderr}"
        )
    return json.loads(proc.stdout)


def create(cli: Cli, text: str, *options: str) -> str:
    return cli("create", "--text", text, *options, check=True).stdout.strip()


def show(cli: Cli, local_id: str) -> dict:
    return cli.json("show", local_id)


def test_creates_reach_the_server_as_json_and_with_audio(agent, server, tmp_path):
    content = os.urandom(30_000)
    src = tmp_path / "take.wav"
    src.write_bytes(content)
    plain = create(agent, "plain", "--meta", "n=1")
    voiced = create(agent, "voiced", "--audio", str(src))
    summary = sync(agent, want=0)
    assert (summary["ok"], summary["created"]) == (True, 2)
    on_server = {j["local_id"]: j for j in server.jobs()}
    assert set(on_server) == {plain, voiced}
    assert (on_server[plain]["text"], on_server[plain]["metadata"], on_server[plain]["audio"]) == (
        "plain",
        {"n": 1},
        None,
    )
    assert on_server[plain]["status"] == "submitted"
    audio = on_server[voiced]["audio"]
    assert (audio["size"], audio["sha256"]) == (len(content), hashlib.sha256(content).hexdigest())
    for lid in (plain, voiced):
        job = show(agent, lid)
        assert (job["sync_status"], job["server_id"], job["server_status"]) == (
            "synced",
            on_server[lid]["id"],
            "submitted",
        )


def test_an_update_reaches_the_server_without_overwriting_fields_it_did_not_change(agent, server):
    lid = create(agent, "first", "--meta", "a=1")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    agent("update", lid, "--text", "second", check=True)
    server.edit(sid, metadata={"a": 1, "other_client": True})
    summary = sync(agent, want=0)
    assert summary["updated"] == 1
    on_server = server.job(sid)
    assert on_server["text"] == "second"
    assert on_server["metadata"] == {"a": 1, "other_client": True}
    assert show(agent, lid)["text"] == "second"


def test_a_metadata_update_replaces_the_whole_object_on_the_server(agent, server):
    lid = create(agent, "m", "--meta", "a=1", "--meta", "b=2")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    agent("update", lid, "--unset-meta", "a", "--meta", "c=[1, 2]", check=True)
    sync(agent, want=0)
    assert server.job(sid)["metadata"] == {"b": 2, "c": [1, 2]}
    assert show(agent, lid)["sync_status"] == "synced"


def test_a_patch_of_a_job_gone_from_the_server_fails_and_retry_creates_it_again(agent, server):
    lid = create(agent, "doomed")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    server.delete(sid)
    agent("update", lid, "--text", "edited", check=True)
    summary = sync(agent, want=1)
    assert summary["failed"] == 1
    job = show(agent, lid)
    assert job["sync_status"] == "failed"
    assert "gone" in job["last_error"].lower()
    agent("retry", lid, check=True)
    sync(agent, want=0)
    (on_server,) = server.jobs()
    assert (on_server["local_id"], on_server["text"]) == (lid, "edited")
    assert show(agent, lid)["server_id"] == on_server["id"]


def test_deletes_reach_the_server_and_a_job_never_sent_just_goes(agent, server, tmp_path):
    src = tmp_path / "a.wav"
    src.write_bytes(b"audio to delete")
    sent = create(agent, "sent", "--audio", str(src))
    sync(agent, want=0)
    job = show(agent, sent)
    managed = Path(job["audio_file"])
    never = create(agent, "never sent")
    agent("delete", sent, check=True)
    agent("delete", never, check=True)
    summary = sync(agent, want=0)
    assert summary["deleted_remote"] == 1
    assert server.job(job["server_id"]) is None
    assert server.jobs() == []
    assert agent.jobs() == []
    assert not managed.exists()
    assert src.exists()


def test_server_edits_win_and_server_created_jobs_are_pulled(agent, server):
    lid = create(agent, "mine")
    sync(agent, want=0)
    sid = show(agent, lid)["server_id"]
    server.edit(sid, text="theirs", metadata={"x": 1}, status="transcribed")
    theirs = str(uuid.uuid4())
    other = server.create(local_id=theirs, text=None, metadata={"from": "web"})
    summary = sync(agent, want=0)
    assert summary["pulled"] == 2
    job = show(agent, lid)
    assert (job["text"], job["metadata"], job["server_status"], job["sync_status"]) == (
        "theirs",
        {"x": 1},
        "transcribed",
        "synced",
    )
    pulled = show(agent, theirs)
    assert (
        pulled["server_id"],
        pulled["text"],
        pulled["metadata"],
        pulled["audio_file"],
        pulled["sync_status"],
    ) == (other["id"], "", {"from": "web"}, None, "synced")
    # Nothing is pushed back: the server copy is unchanged.
    sync(agent, want=0)
    assert server.job(other["id"])["updated_at"] == other["updated_at"]


def test_a_job_deleted_on_the_server_is_removed_here(agent, server, tmp_path):
    src = tmp_path / "g.wav"
    src.write_bytes(b"gone")
    gone = create(agent, "gone", "--audio", str(src))
    keep = create(agent, "keep")
    sync(agent, want=0)
    job = show(agent, gone)
    server.delete(job["server_id"])
    summary = sync(agent, want=0)
    assert summary["deleted_locally"] == 1
    assert [j["local_id"] for j in agent.jobs()] == [keep]
    assert not Path(job["audio_file"]).exists()


def test_the_deletion_guard_holds_until_force_delete(agent, server):
    lids = [create(agent, f"g{i}") for i in range(2)]
    sync(agent, want=0)
    for job in server.jobs():
        server.delete(job["id"])
    summary = sync(agent, want=1)
    assert (summary["deletion_guard"], summary["deleted_locally"]) == (True, 0)
    assert {j["local_id"] for j in agent.jobs()} == set(lids)
    summary = sync(agent, "--force-delete", want=0)
    assert summary["deleted_locally"] == 2
    assert agent.jobs() == []


def test_a_create_whose_answer_is_lost_makes_no_duplicate(agent, server):
    with FaultProxy("127.0.0.1", server.port) as proxy:
        agent.env["JOBSYNCD_SERVER_URL"] = proxy.url
        lid = create(agent, "once")
        proxy.reset_after = 0  # the server gets each request, the agent never gets an answer
        summary = sync(agent, want=1)
        assert summary["skipped"] is None
        assert summary["errors"] == 1
        assert [j["local_id"] for j in server.jobs()] == [lid]
        assert show(agent, lid)["sync_status"] == "error"
        proxy.reset_after = None
        sync(agent, want=0)
    (on_server,) = server.jobs()
    job = show(agent, lid)
    assert (job["sync_status"], job["server_id"], job["retry_count"]) == (
        "synced",
        on_server["id"],
        0,
    )


def test_a_second_agent_pulls_every_job_across_listing_pages(agent, server, jobsyncd_bin, tmp_path):
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
        [sys.executable, "-c", script, str(agent.data_dir), "510"], check=True, timeout=60
    )
    summary = sync(agent, want=0)
    assert summary["created"] == 510
    home = tmp_path / "home2"
    home.mkdir()
    second = Cli(jobsyncd_bin, tmp_path / "data2", home)
    second.env.update(
        {
            k: v
            for k, v in agent.env.items()
            if k.startswith("JOBSYNCD_") and k != "JOBSYNCD_DATA_DIR"
        }
    )
    summary = sync(second, want=0)
    assert summary["pulled"] == 510
    mine = {j["local_id"]: j for j in agent.jobs()}
    theirs = {j["local_id"]: j for j in second.jobs()}
    assert set(theirs) == set(mine)
    assert {j["sync_status"] for j in theirs.values()} == {"synced"}
    assert all(theirs[k]["server_id"] == mine[k]["server_id"] for k in mine)
    # Neither agent removes anything on the next pass.
    assert sync(agent, want=0)["deleted_locally"] == 0
    assert sync(second, want=0)["deleted_locally"] == 0


def test_passes_over_a_lazily_folded_store_end_as_eager_ones_would(agent, server):
    """The second and later passes fold the store lazily (jobs.checked.json): the lines the
    first pass checked stay unparsed. Edits, deletes, server edits and a `compact` between
    passes must still end exactly as the jobs say, with every file in the data dir 0600."""
    import stat

    from test_sync import bulk_create

    bulk_create(agent, 150)  # enough lines for the first pass to compact
    ids = [j["local_id"] for j in sorted(agent.jobs(), key=lambda j: j["metadata"]["n"])]
    sync(agent, want=0)
    checked = agent.data_dir / "jobs.checked.json"
    assert checked.exists()  # the first pass compacted and recorded its lines as checked
    for i in range(0, 10):
        agent("update", ids[i], "--text", f"edited {i}", check=True)
    for i in range(10, 15):
        agent("delete", ids[i], check=True)
    by_local = {j["local_id"]: j for j in server.jobs()}
    server.edit(by_local[ids[20]]["id"], text="edited on the server")
    summary = sync(agent, want=0)
    assert (summary["updated"], summary["deleted_remote"], summary["pulled"]) == (10, 5, 1)
    agent("update", ids[30], "--text", "after a compact", check=True)
    agent("compact", check=True)
    agent("update", ids[31], "--text", "after a compact too", check=True)
    assert sync(agent, want=0)["updated"] == 2
    expected = {lid: f"bulk {i}" for i, lid in enumerate(ids) if not 10 <= i < 15}
    expected.update({ids[i]: f"edited {i}" for i in range(10)})
    expected[ids[20]] = "edited on the server"
    expected[ids[30]], expected[ids[31]] = "after a compact", "after a compact too"
    on_server = {j["local_id"]: j["text"] for j in server.jobs()}
    here = {j["local_id"]: j["text"] for j in agent.jobs()}
    assert on_server == here == expected
    assert all(j["sync_status"] == "synced" for j in agent.jobs())
    for path in agent.data_dir.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
