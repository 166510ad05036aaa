"""Black-box tests of batch push (contract 6.3 "Batches"): the installed `jobsyncd sync` against
the fault server with `POST /api/v1/batch` on or off.

Each job ends exactly as it would with single requests; a whole-batch failure is an error for
each of its jobs; a lost answer makes no duplicate; a result list shorter than the operations is
an error for the missing ones; a server without the endpoint is sent one request per job.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from helpers import jobs_by_id, sync_json

pytestmark = pytest.mark.timeout(120)

JOBS = "/api/v1/jobs"
BATCH = "/api/v1/batch"


@pytest.fixture
def srv(fault_server):
    fault_server.batch = True
    return fault_server


@pytest.fixture
def agent(cli, srv):
    cli.env["JOBSYNCD_SERVER_URL"] = srv.url
    cli.env["JOBSYNCD_REQUEST_TIMEOUT_SECONDS"] = "2"
    return cli


def sync(cli, *extra: str, want: int | None = None) -> dict:
    return sync_json(cli, *extra, want=want)[1]


def create(cli, text: str, *meta: str) -> str:
    args = ["create", "--text", text]
    for pair in meta:
        args += ["--meta", pair]
    return cli(*args, check=True).stdout.strip()


def posts(srv, path: str) -> int:
    return sum(1 for m, p, _ in srv.all_requests if m == "POST" and p.split("?")[0] == path)


by_id = jobs_by_id


def test_new_jobs_go_up_in_batches_of_at_most_500(agent, srv, tmp_path):
    from test_sync import bulk_create

    bulk_create(agent, 620)
    summary = sync(agent, want=0)
    assert summary["created"] == 620
    assert posts(srv, BATCH) == 2 and posts(srv, JOBS) == 0
    assert len(srv.snapshot()) == 620
    assert all(j["sync_status"] == "synced" for j in agent.jobs())


def test_audio_jobs_keep_their_own_requests(agent, srv, tmp_path):
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF" + b"\0" * 100)
    agent("create", "--text", "with audio", "--audio", str(wav), check=True)
    create(agent, "plain")
    summary = sync(agent, want=0)
    assert summary["created"] == 2
    assert posts(srv, BATCH) == 1 and posts(srv, JOBS) == 1


def mixed_history(agent, srv) -> tuple[list[str], dict[str, str]]:
    """Creates, updates and deletes; some updates hit jobs gone on the server (404). The jobs
    are made through jobsyncd.jobs, what `create`, `update` and `delete` run (55 processes
    less for each run); the passes are the installed `jobsyncd sync`."""
    from jobsyncd.jobs import create_job, delete_job, update_job
    from jobsyncd.store import Store, prepare_data_dir

    store = Store(prepare_data_dir(str(agent.data_dir)))
    ids = [create_job(store, f"job {i}", None, {"n": i}).local_id for i in range(30)]
    sync(agent, want=0)
    for i, lid in enumerate(ids[:10]):
        update_job(store, lid, f"edited {i}", None, {}, [])
    for lid in ids[10:15]:
        delete_job(store, lid)
    for lid in ids[15:18]:  # gone on the server: the update gets 404
        update_job(store, lid, "edited but gone", None, {}, [])
        srv.server_delete(srv.job_by_local_id(lid)["id"])
    new = [create_job(store, f"new {i}", None, {}).local_id for i in range(5)]
    return ids + new, {}


def outcome(agent, srv) -> tuple[dict, dict]:
    local = {
        lid: (j["sync_status"], j["text"], bool(j["server_id"]), (j["last_error"] or "")[:20])
        for lid, j in by_id(agent).items()
    }
    remote = {j["local_id"]: (j["text"], j["metadata"]) for j in srv.snapshot()}
    return local, remote


@pytest.mark.parametrize("rounds", [1, 2])
def test_a_mixed_push_ends_the_same_with_batches_and_with_single_requests(
    cli, tmp_path, rounds
):
    from faultserver import FaultServer

    results = {}
    for mode in ("batch", "single"):
        with FaultServer() as srv:
            srv.batch = mode == "batch"
            agent = cli
            agent.data_dir = tmp_path / f"data-{mode}-{rounds}"
            agent.env["JOBSYNCD_DATA_DIR"] = str(agent.data_dir)
            agent.env["JOBSYNCD_SERVER_URL"] = srv.url
            ids, _ = mixed_history(agent, srv)
            summaries = [sync(agent) for _ in range(rounds)]
            # local_ids differ between runs: compare by position in the history
            local, remote = outcome(agent, srv)
            results[mode] = (
                [local.get(lid) for lid in ids],
                sorted(remote.values(), key=json.dumps),
                [{k: v for k, v in s.items() if k != "handed_to_daemon"} for s in summaries],
            )
            if mode == "batch":
                assert posts(srv, BATCH) >= 1
    assert results["batch"][0] == results["single"][0]
    assert results["batch"][1] == results["single"][1]
    assert results["batch"][2] == results["single"][2]


def test_a_batch_answer_lost_after_the_server_applied_it_makes_no_duplicate(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(5)]
    srv.add_fault("POST", BATCH, drop_after_store=True)
    summary = sync(agent, want=1)
    assert summary["errors"] == 5
    sync(agent, want=0)
    assert sorted(j["local_id"] for j in srv.snapshot()) == sorted(ids)


def test_a_batch_answered_500_is_an_error_for_each_of_its_jobs(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(4)]
    srv.add_fault("POST", BATCH, status=500)
    summary = sync(agent, want=1)
    assert summary["errors"] == 4 and summary["skipped"] is None
    assert all(by_id(agent)[lid]["sync_status"] == "error" for lid in ids)


def test_a_batch_answered_503_stops_the_pass_and_is_honoured(agent, srv):
    create(agent, "x")
    srv.add_fault("POST", BATCH, status=503, headers={"Retry-After": "1"})
    summary = sync(agent, want=75)
    assert summary["skipped"] == "backoff" and summary["errors"] == 0


def test_a_result_list_shorter_than_the_operations_is_an_error_for_the_missing_ones(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(5)]
    srv.batch_truncate = 3
    summary = sync(agent, want=1)
    assert summary["created"] == 3 and summary["errors"] == 2
    statuses = sorted(by_id(agent)[lid]["sync_status"] for lid in ids)
    assert statuses == ["error", "error", "synced", "synced", "synced"]
    srv.batch_truncate = None
    sync(agent, want=0)
    assert sorted(j["local_id"] for j in srv.snapshot()) == sorted(ids)


def test_a_413_on_a_batch_makes_smaller_batches(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(12)]
    srv.batch_max_ops = 5
    summary = sync(agent, want=0)
    assert summary["created"] == 12
    assert sorted(j["local_id"] for j in srv.snapshot()) == sorted(ids)


def test_per_operation_503_is_an_error_for_its_job_only(agent, srv):
    a = create(agent, "a")
    sync(agent, want=0)
    agent("update", a, "--text", "a2", check=True)
    b = create(agent, "b")
    # A result of 503 for one operation: the fault server cannot make it, so answer the whole
    # batch with a crafted result list.
    srv.add_fault(
        "POST",
        BATCH,
        status=200,
        body={
            "results": [
                {"status": 503, "job": None, "error": "busy"},
                {"status": 201, "job": srv.server_create(local_id=b, text="b"), "error": None},
            ]
        },
    )
    summary = sync(agent, want=1)
    assert summary["skipped"] is None
    jobs = by_id(agent)
    assert {jobs[a]["sync_status"], jobs[b]["sync_status"]} == {"error", "synced"}


def test_a_server_without_the_batch_endpoint_gets_single_requests_and_is_asked_again_later(
    agent, srv
):
    srv.batch = False
    ids = [create(agent, f"job {i}") for i in range(3)]
    summary = sync(agent, want=0)
    assert summary["created"] == 3
    assert posts(srv, BATCH) == 1 and posts(srv, JOBS) == 3
    srv.clear_requests()
    create(agent, "more")
    sync(agent, want=0)
    assert posts(srv, BATCH) == 0, "asked again only after a day"
    state_file = agent.data_dir / "pull_state.json"
    state = json.loads(state_file.read_text())
    state["batch"]["checked_at"] -= 2 * 86400
    state_file.write_text(json.dumps(state))
    srv.batch = True
    create(agent, "again")
    srv.clear_requests()
    sync(agent, want=0)
    assert posts(srv, BATCH) == 1 and posts(srv, JOBS) == 0
    assert len(srv.snapshot()) == len(ids) + 2


def test_update_no_audio_reaches_the_server_as_audio_null_in_a_batch(agent, srv, tmp_path):
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"RIFF" + b"\0" * 10)
    lid = agent("create", "--text", "x", "--audio", str(wav), check=True).stdout.strip()
    sync(agent, want=0)
    assert srv.job_by_local_id(lid)["audio"] is not None
    proc = agent("update", lid, "--no-audio")
    if proc.returncode == 2 and "no-audio" in proc.stderr:
        pytest.skip("update --no-audio is not in this build")
    assert proc.returncode == 0, proc.stderr
    sync(agent, want=0)
    assert srv.job_by_local_id(lid)["audio"] is None
    assert by_id(agent)[lid]["sync_status"] == "synced"


def test_every_job_is_attempted_at_most_once_per_pass(agent, srv):
    ids = [create(agent, f"job {i}") for i in range(3)]
    srv.add_fault("POST", BATCH, status=500)
    sync(agent, want=1)
    assert posts(srv, BATCH) == 1 and posts(srv, JOBS) == 0
    assert str(uuid.UUID(ids[0])) == ids[0]


def test_a_batch_is_sent_only_once_the_one_before_is_answered_so_a_503_stops_the_rest(
    agent, srv
):
    from test_sync import bulk_create

    bulk_create(agent, 1200)  # three batches
    srv.add_fault("POST", BATCH, status=503, headers={"Retry-After": "1"})
    summary = sync(agent, want=75)
    assert summary["skipped"] == "backoff"
    assert posts(srv, BATCH) == 1 and posts(srv, JOBS) == 0
    assert srv.snapshot() == []
    assert all(j["sync_status"] == "pending" for j in agent.jobs())


def test_a_batch_lost_between_others_is_an_error_for_its_jobs_only_and_makes_no_duplicate(
    agent, srv
):
    from test_sync import bulk_create

    bulk_create(agent, 1200)
    srv.add_fault("POST", BATCH, drop_after_store=True)  # the first batch's answer is lost
    summary = sync(agent, want=1)
    assert (summary["created"], summary["errors"]) == (700, 500)
    assert posts(srv, BATCH) == 3
    sync(agent, want=0)
    assert len(srv.snapshot()) == 1200
    assert len({j["local_id"] for j in srv.snapshot()}) == 1200


def test_an_edit_made_while_its_batch_is_in_flight_stays_pending_and_reaches_the_server_next(
    agent, srv
):
    import threading

    from helpers import poll

    edited, other = create(agent, "v1"), create(agent, "other")
    event = threading.Event()
    srv.add_fault("POST", BATCH, delay_event=event)
    proc = agent.popen("sync", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        poll(lambda: posts(srv, BATCH) >= 1)
        agent("update", edited, "--text", "v2", check=True, timeout=10)
        assert proc.poll() is None, "the pass ended before the server answered"
        event.set()
        proc.communicate(timeout=30)
    finally:
        event.set()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    jobs = by_id(agent)
    assert (jobs[edited]["text"], jobs[edited]["sync_status"]) == ("v2", "pending")
    assert jobs[other]["sync_status"] == "synced"
    assert srv.job_by_local_id(edited)["text"] == "v1"
    sync(agent, want=0)
    assert srv.job_by_local_id(edited)["text"] == "v2"
    assert by_id(agent)[edited]["sync_status"] == "synced"


@pytest.mark.parametrize("earlier", ["before the pass", "in the same batch"])
def test_a_batch_answer_naming_a_server_id_another_job_holds_is_an_error_and_binds_nothing(
    agent, srv, earlier
):
    first = create(agent, "first")
    if earlier == "before the pass":
        sync(agent, want=0)
    second = create(agent, "second")
    taken = srv.server_create(local_id=second, text="second")  # the id the answers will name
    if earlier == "before the pass":
        taken["id"] = srv.job_by_local_id(first)["id"]
        results = [{"status": 201, "job": taken, "error": None}]
    else:
        mine = srv.server_create(local_id=first, text="first")
        results = [
            {"status": 201, "job": mine, "error": None},
            {"status": 201, "job": {**taken, "id": mine["id"]}, "error": None},
        ]
    srv.add_fault("POST", BATCH, status=200, body={"results": results})
    summary = sync(agent, want=1)
    assert summary["errors"] == 1
    jobs = by_id(agent)
    assert jobs[second]["sync_status"] == "error" and jobs[second]["server_id"] is None
    assert jobs[first]["server_id"] is not None
