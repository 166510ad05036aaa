"""GET /api/v1/changes against a live server on each engine (contract section 7): the feed,
its pages and checkpoints, the 410s, the long-poll, tombstones and `new-history`."""

from __future__ import annotations

import base64
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pgtest
import pytest
import requests
from serverproc import RunningServer, new_job, server_script


def changes(
    client: requests.Session, server: RunningServer, **params: Any
) -> tuple[int, dict[str, Any]]:
    answer = client.get(server.changes_url, params=params, timeout=90)
    return answer.status_code, answer.json()


def test_the_feed_from_the_beginning_holds_each_job_once_as_its_latest_change(
    server: RunningServer,
) -> None:
    with server.session() as client:
        a, b, c = (new_job(client, server.jobs_url) for _ in range(3))
        changed = client.patch(f"{server.jobs_url}/{a['id']}", json={"status": "done"}).json()
        assert client.delete(f"{server.jobs_url}/{b['id']}").status_code == 204
        status, page = changes(client, server)
    assert status == 200
    assert page["changes"] == [
        c,
        changed,
        {"id": b["id"], "local_id": b["local_id"], "deleted": True},
    ]
    assert page["more"] is False and isinstance(page["next"], str)


def test_following_next_gives_only_what_changed_since(server: RunningServer) -> None:
    with server.session() as client:
        new_job(client, server.jobs_url)
        _, first = changes(client, server)
        _, nothing = changes(client, server, since=first["next"])
        assert nothing == {"changes": [], "next": first["next"], "more": False}
        later = new_job(client, server.jobs_url)
        _, second = changes(client, server, since=first["next"])
        assert second["changes"] == [later]


def test_limit_pages_the_feed_with_more_and_next(server: RunningServer) -> None:
    with server.session() as client:
        made = [new_job(client, server.jobs_url)["id"] for _ in range(7)]
        seen: list[str] = []
        since: str | None = None
        for _ in range(10):
            params: dict[str, Any] = {"limit": 3}
            if since:
                params["since"] = since
            _, page = changes(client, server, **params)
            seen += [change["id"] for change in page["changes"]]
            since = page["next"]
            if not page["more"]:
                break
        assert seen == made


def test_limit_defaults_to_500_and_is_capped_at_5000(server: RunningServer) -> None:
    with server.session() as client:
        for _ in range(501):
            new_job(client, server.jobs_url)
        _, page = changes(client, server)
        assert len(page["changes"]) == 500 and page["more"] is True
        _, capped = changes(client, server, limit=99999)
        assert len(capped["changes"]) == 501 and capped["more"] is False


@pytest.mark.parametrize(
    "params",
    [
        {"wait": "soon"},
        {"wait": "nan"},
        {"wait": "-1"},
        {"limit": "ten"},
        {"limit": "0"},
        {"limit": "1.5"},
        {"limit": ["1", "2"]},
    ],
)
def test_a_wait_or_limit_that_is_not_a_number_is_400(
    shared_server: RunningServer, client: requests.Session, params: dict[str, Any]
) -> None:
    answer = client.get(shared_server.changes_url, params=params)
    assert answer.status_code == 400, answer.text
    assert isinstance(answer.json()["error"], str)


def test_other_methods_on_the_feed_are_405_with_allow(
    shared_server: RunningServer, client: requests.Session
) -> None:
    answer = client.post(shared_server.changes_url, json={})
    assert answer.status_code == 405 and answer.headers["Allow"] == "GET"


def forged(checkpoint: str) -> list[str]:
    raw = bytearray(base64.urlsafe_b64decode(checkpoint + "=" * (-len(checkpoint) % 4)))
    raw[-1] ^= 1
    return [
        "garbage",
        base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="),
        checkpoint[:-2],
        checkpoint + "AA",
    ]


def test_a_garbled_checkpoint_is_410_diverged(server: RunningServer) -> None:
    with server.session() as client:
        new_job(client, server.jobs_url)
        _, page = changes(client, server)
        for bad in forged(page["next"]):
            status, error = changes(client, server, since=bad)
            assert status == 410 and error["reason"] == "diverged", bad
            assert isinstance(error["error"], str)


def test_another_servers_checkpoint_is_410_diverged(
    server_factory: Callable[..., RunningServer], tmp_path_factory: pytest.TempPathFactory
) -> None:
    one = server_factory()
    other_db = pgtest.create_database() if one.db_url else None
    other = server_factory(workdir=tmp_path_factory.mktemp("other"), db_url=other_db)
    with one.session() as client:
        new_job(client, one.jobs_url)
        _, page = changes(client, one)
    with other.session() as client:
        new_job(client, other.jobs_url)
        status, error = changes(client, other, since=page["next"])
    assert (status, error["reason"]) == (410, "diverged")
    if other_db:
        other.stop()
        pgtest.drop_database(other_db)


def test_another_users_checkpoint_is_410_diverged(
    server_factory: Callable[..., RunningServer], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text("alice tok-a\nbob tok-b\n")
    server = server_factory("--token-file", str(tokens))
    with server.session("tok-a") as alice, server.session("tok-b") as bob:
        new_job(alice, server.jobs_url)
        _, page = changes(alice, server)
        status, error = changes(bob, server, since=page["next"])
        assert (status, error["reason"]) == (410, "diverged")
        assert changes(bob, server)[1]["changes"] == []


def new_history(server: RunningServer) -> subprocess.CompletedProcess[str]:
    db = server.db_url or str(server.db)
    return subprocess.run(
        [server_script(), "new-history", "--db", db], capture_output=True, text=True, timeout=60
    )


def test_new_history_makes_every_earlier_checkpoint_diverged_and_keeps_the_jobs(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory()
    with server.session() as client:
        job = new_job(client, server.jobs_url)
        _, page = changes(client, server)
    assert server.stop() == 0
    result = new_history(server)
    assert result.returncode == 0, result.stderr
    again = server_factory()
    with again.session() as client:
        status, error = changes(client, again, since=page["next"])
        assert (status, error["reason"]) == (410, "diverged")
        status, fresh = changes(client, again)
        assert status == 200 and fresh["changes"] == [job]
        assert changes(client, again, since=fresh["next"])[0] == 200


def test_new_history_without_a_database_exits_2(tmp_path: Any) -> None:
    result = subprocess.run(
        [server_script(), "new-history", "--db", str(tmp_path / "none.sqlite3")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


class Backup:
    """A copy of a stopped server's database, put back later: the file on SQLite, a template
    copy of the database on PostgreSQL."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        if server.db_url:
            self.copy = pgtest.sibling(server.db_url)
            pgtest.copy_database(server.db_url, self.copy)
        else:
            self.data = server.db.read_bytes()

    def restore(self) -> None:
        if self.server.db_url:
            pgtest.copy_database(self.copy, self.server.db_url)
            pgtest.drop_database(self.copy)
            return
        for suffix in ("-wal", "-shm"):
            self.server.db.with_name(self.server.db.name + suffix).unlink(missing_ok=True)
        self.server.db.write_bytes(self.data)


def test_a_database_restored_without_new_history_makes_a_later_checkpoint_diverged(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory()
    with server.session() as client:
        new_job(client, server.jobs_url)
    assert server.stop() == 0
    backup = Backup(server)
    again = server_factory()
    with again.session() as client:
        new_job(client, again.jobs_url)
        _, page = changes(client, again)
    assert again.stop() == 0
    backup.restore()
    restored = server_factory()
    with restored.session() as client:
        status, error = changes(client, restored, since=page["next"])
    assert (status, error["reason"]) == (410, "diverged")


def test_a_restore_with_new_history_makes_every_earlier_checkpoint_diverged(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory()
    with server.session() as client:
        kept = new_job(client, server.jobs_url)
        _, at_backup = changes(client, server)
    assert server.stop() == 0
    backup = Backup(server)
    again = server_factory()
    with again.session() as client:
        new_job(client, again.jobs_url)
    assert again.stop() == 0
    backup.restore()
    assert new_history(server).returncode == 0
    restored = server_factory()
    with restored.session() as client:
        # The checkpoint taken at the backup is not ahead of the restored database: only the
        # new history tells the agent that changes it has seen since are gone.
        status, error = changes(client, restored, since=at_backup["next"])
        assert (status, error["reason"]) == (410, "diverged")
        assert changes(client, restored)[1]["changes"] == [kept]


def test_after_a_restore_with_new_history_an_etag_from_after_the_backup_never_answers_304(
    server_factory: Callable[..., RunningServer],
) -> None:
    # Found by the state machine: the restored counters are handed out again, so without a new
    # ETag epoch the listing after one new job had the very ETag of the lost listing after one
    # new job, and an agent holding that ETag was told nothing changed.
    server = server_factory()
    with server.session() as client:
        new_job(client, server.jobs_url)
    assert server.stop() == 0
    backup = Backup(server)
    again = server_factory()
    with again.session() as client:
        new_job(client, again.jobs_url)
        lost_etag = client.get(again.jobs_url).headers["ETag"]
    assert again.stop() == 0
    backup.restore()
    assert new_history(server).returncode == 0
    restored = server_factory()
    with restored.session() as client:
        other = new_job(client, restored.jobs_url)
        answer = client.get(restored.jobs_url, headers={"If-None-Match": lost_etag})
        assert answer.status_code == 200
        assert other["id"] in {job["id"] for job in answer.json()["jobs"]}


def test_tombstones_kept_0_days_are_purged_at_start_and_older_checkpoints_expire(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory("--tombstone-days", "0")
    with server.session() as client:
        job = new_job(client, server.jobs_url)
        _, before = changes(client, server)
        assert client.delete(f"{server.jobs_url}/{job['id']}").status_code == 204
        _, after = changes(client, server, since=before["next"])
        assert after["changes"] == [{"id": job["id"], "local_id": job["local_id"], "deleted": True}]
    assert server.stop() == 0
    again = server_factory("--tombstone-days", "0")
    with again.session() as client:
        status, error = changes(client, again, since=before["next"])
        assert (status, error["reason"]) == (410, "expired")
        assert changes(client, again, since=after["next"])[1]["changes"] == []
        assert changes(client, again)[1]["changes"] == []


def test_tombstones_are_kept_by_default_across_a_restart(
    server_factory: Callable[..., RunningServer],
) -> None:
    server = server_factory("--tombstone-days", "0.5")
    with server.session() as client:
        job = new_job(client, server.jobs_url)
        _, before = changes(client, server)
        client.delete(f"{server.jobs_url}/{job['id']}")
    assert server.stop() == 0
    again = server_factory()
    with again.session() as client:
        _, page = changes(client, again, since=before["next"])
    assert page["changes"] == [{"id": job["id"], "local_id": job["local_id"], "deleted": True}]


@pytest.mark.parametrize("days", ["-1", "nan", "soon"])
def test_a_bad_tombstone_days_is_refused_at_start(tmp_path: Any, days: str) -> None:
    result = subprocess.run(
        [
            server_script(),
            "--port",
            "0",
            "--db",
            str(tmp_path / "db"),
            "--audio-dir",
            str(tmp_path / "a"),
            "--tombstone-days",
            days,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_a_long_poll_without_a_change_answers_empty_when_wait_passes(
    server: RunningServer,
) -> None:
    with server.session() as client:
        new_job(client, server.jobs_url)
        _, page = changes(client, server)
        started = time.monotonic()
        status, empty = changes(client, server, since=page["next"], wait="0.5")
        assert time.monotonic() - started >= 0.5
    assert status == 200 and empty == {"changes": [], "next": page["next"], "more": False}


def test_a_long_poll_returns_the_change_that_arrives_while_it_waits(
    server: RunningServer,
) -> None:
    with server.session() as client:
        _, page = changes(client, server)
        result: list[tuple[int, dict[str, Any]]] = []
        # A wait above 60 is taken as 60, not refused; the change ends the wait long before.
        poll = threading.Thread(
            target=lambda: result.append(changes(client, server, since=page["next"], wait=600))
        )
        poll.start()
        time.sleep(0.3)  # let the long-poll reach its wait; the outcome does not depend on it
        with server.session() as writer:
            job = new_job(writer, server.jobs_url)
        poll.join(timeout=60)
    assert not poll.is_alive()
    assert result[0][0] == 200 and result[0][1]["changes"] == [job]


def test_the_missing_postgres_driver_stops_the_server_with_exit_2_naming_the_extra(
    tmp_path: Any,
) -> None:
    import sys

    code = (
        "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg_pool'] = None\n"
        "from jobsyncd.server.cli import main\n"
        "sys.exit(main(['--port', '0', '--db', 'postgresql://nobody@127.0.0.1:1/x',"
        f" '--audio-dir', {str(tmp_path / 'a')!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "jobsyncd[postgres]" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unreachable_postgres_stops_the_server_with_exit_2(tmp_path: Any) -> None:
    result = subprocess.run(
        [
            server_script(),
            "--port",
            "0",
            "--db",
            "postgresql://nobody:secret@127.0.0.1:1/x",
            "--audio-dir",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "secret" not in result.stderr
