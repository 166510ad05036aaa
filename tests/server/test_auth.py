"""Tokens: one token for one user, or NAME TOKEN lines with a collection per user."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from serverproc import RunningServer, new_job, server_script


def token_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"tokens-{uuid.uuid4().hex[:6]}"
    path.write_text(text)
    return path


def test_a_single_token_is_required_on_every_request(
    tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    tokens = token_file(tmp_path, "# the one token\n\ns3cret-token\n")
    server = server_factory("--token-file", str(tokens), token="s3cret-token")
    assert "accepts" not in server.log_text() and "every client" not in server.log_text()
    with server.session() as client:
        job = new_job(client, server.jobs_url)
    with server.session(token="wrong") as wrong:
        for answer in (
            wrong.get(server.jobs_url),
            wrong.get(f"{server.jobs_url}/{job['id']}"),
            wrong.post(server.jobs_url, json={"local_id": str(uuid.uuid4())}),
            wrong.delete(f"{server.jobs_url}/{job['id']}"),
        ):
            assert answer.status_code == 401
            assert answer.headers["Content-Type"] == "application/json"
            assert "error" in answer.json()
    import requests

    assert requests.get(server.jobs_url, timeout=10).status_code == 401
    basic = requests.get(server.jobs_url, headers={"Authorization": "Basic eDp5"}, timeout=10)
    assert basic.status_code == 401


def test_users_see_and_change_only_their_own_jobs(
    tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    tokens = token_file(tmp_path, "alice tok-alice\n# comment\nbob   tok-bob\n")
    server = server_factory("--token-file", str(tokens))
    alice, bob = server.session("tok-alice"), server.session("tok-bob")
    job = new_job(alice, server.jobs_url)
    url = f"{server.jobs_url}/{job['id']}"
    assert bob.get(url).status_code == 404
    assert bob.patch(url, json={"text": "mine now"}).status_code == 404
    assert bob.delete(url).status_code == 404
    assert bob.get(server.jobs_url).json() == {"jobs": [], "next_cursor": None}
    assert alice.get(url).json() == job


def test_the_idempotent_create_is_scoped_per_user(
    tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    tokens = token_file(tmp_path, "alice tok-alice\nbob tok-bob\n")
    server = server_factory("--token-file", str(tokens))
    alice, bob = server.session("tok-alice"), server.session("tok-bob")
    local_id = str(uuid.uuid4())
    first = alice.post(server.jobs_url, json={"local_id": local_id, "text": "alice's"})
    other = bob.post(server.jobs_url, json={"local_id": local_id, "text": "bob's"})
    assert (first.status_code, other.status_code) == (201, 201)
    assert other.json()["id"] != first.json()["id"]
    assert other.json()["text"] == "bob's"


def test_each_user_has_their_own_etag_and_cursors(
    tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    tokens = token_file(tmp_path, "alice tok-alice\nbob tok-bob\n")
    server = server_factory("--token-file", str(tokens))
    alice, bob = server.session("tok-alice"), server.session("tok-bob")
    for _ in range(3):
        new_job(alice, server.jobs_url)
        new_job(bob, server.jobs_url)
    bob_etag = bob.get(server.jobs_url).headers["ETag"]
    new_job(alice, server.jobs_url)
    assert bob.get(server.jobs_url, headers={"If-None-Match": bob_etag}).status_code == 304
    alice_cursor = alice.get(server.jobs_url, params={"limit": 1}).json()["next_cursor"]
    assert bob.get(server.jobs_url, params={"cursor": alice_cursor}).status_code == 400


@pytest.mark.parametrize(
    "text",
    [
        "one two three\n",  # three fields
        "tok1\ntok2\n",  # two bare tokens
        "tok1\nalice tok2\n",  # a bare token mixed with NAME TOKEN lines
        "alice tok1\nalice tok2\n",  # a name twice
        "alice tok\nbob tok\n",  # a token twice
        "# only comments\n\n",  # no token at all
    ],
)
def test_a_bad_token_file_is_refused_at_start_with_one_line(tmp_path: Path, text: str) -> None:
    tokens = token_file(tmp_path, text)
    result = subprocess.run(
        [
            server_script(),
            "--port",
            "0",
            "--db",
            str(tmp_path / "db"),
            "--audio-dir",
            str(tmp_path / "audio"),
            "--token-file",
            str(tokens),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "listening" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_a_missing_token_file_is_refused_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            server_script(),
            "--port",
            "0",
            "--db",
            str(tmp_path / "db"),
            "--token-file",
            "/nonexistent/x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_without_a_token_file_the_server_warns_that_it_accepts_everyone(
    server: RunningServer,
) -> None:
    assert "every client is accepted" in server.log_text()
