"""Start, stop and restart: signals exit 0, a restart keeps every job and audio file, settings
come from options or JOBSYNCD_SERVER_*, and the packaged OpenAPI file equals docs/openapi.yaml."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from serverproc import RunningServer, new_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly(
    server_factory: Callable[..., RunningServer], sig: int
) -> None:
    server = server_factory()
    with server.session() as client:
        new_job(client, server.jobs_url)  # leaves an idle keep-alive connection open
        assert server.stop(sig) == 0
    assert "Traceback" not in server.log_text()


def test_a_restart_keeps_every_job_and_audio_file(
    tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    server = server_factory(workdir=tmp_path)
    audio = uuid.uuid4().bytes * 1000
    with server.session() as client:
        jobs = [new_job(client, server.jobs_url) for _ in range(5)]
        with_audio = client.post(
            server.jobs_url, data={"local_id": str(uuid.uuid4())}, files={"audio": ("a", audio)}
        ).json()
        cursor = client.get(server.jobs_url, params={"limit": 2}).json()["next_cursor"]
        etag = client.get(server.jobs_url).headers["ETag"]
    assert server.stop() == 0
    again = server_factory(workdir=tmp_path)
    with again.session() as client:
        listed = client.get(again.jobs_url).json()["jobs"]
        assert listed == [*jobs, with_audio]
        assert client.get(again.jobs_url, params={"cursor": cursor}).status_code == 200
        assert client.get(again.jobs_url, headers={"If-None-Match": etag}).status_code == 304
    stored = [p for p in again.audio_dir.iterdir() if p.is_file()]
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in stored] == [
        with_audio["audio"]["sha256"]
    ]


@pytest.mark.sqlite_only
def test_the_schema_version_is_recorded_for_later_migrations(server: RunningServer) -> None:
    from jobsyncd.server.storage import SCHEMA_VERSION

    with server.session() as client:
        new_job(client, server.jobs_url)
    conn = sqlite3.connect(server.db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_a_database_from_a_newer_release_is_refused_at_start(
    tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    import subprocess

    from serverproc import server_script

    db = tmp_path / "newer.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    result = subprocess.run(
        [server_script(), "--port", "0", "--db", str(db), "--audio-dir", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "newer" in result.stderr and "Traceback" not in result.stderr


def test_settings_come_from_the_environment_and_options_win(
    tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    env_db, env_audio = tmp_path / "env.sqlite3", tmp_path / "env-audio"
    tokens = tmp_path / "tokens"
    tokens.write_text("env-token\n")
    env = {
        "JOBSYNCD_SERVER_DB": str(env_db),
        "JOBSYNCD_SERVER_AUDIO_DIR": str(env_audio),
        "JOBSYNCD_SERVER_TOKEN_FILE": str(tokens),
        "JOBSYNCD_SERVER_MAX_UPLOAD_BYTES": "1000",
    }
    from serverproc import start_server

    server = start_server(
        tmp_path / "w1", "--db", str(env_db), "--audio-dir", str(env_audio), env=env
    )
    try:
        with server.session("env-token") as client:
            new_job(client, server.jobs_url)
            too_big = client.post(
                server.jobs_url,
                data={"local_id": str(uuid.uuid4())},
                files={"audio": ("a", b"x" * 1001)},
            )
            assert too_big.status_code == 413
        assert server.session("other").get(server.jobs_url).status_code == 401
    finally:
        server.stop()
    option_db = tmp_path / "option.sqlite3"
    overridden = server_factory(
        "--db", str(option_db), "--max-upload-bytes", "5000", token="env-token", env=env
    )
    with overridden.session() as client:
        assert client.get(overridden.jobs_url).json()["jobs"] == []
        answer = client.post(
            overridden.jobs_url,
            data={"local_id": str(uuid.uuid4())},
            files={"audio": ("a", b"x" * 1001)},
        )
        assert answer.status_code == 201
    assert option_db.exists() and env_db.exists()


def test_create_app_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobsyncd.server import create_app

    monkeypatch.setenv("JOBSYNCD_SERVER_DB", str(tmp_path / "x.sqlite3"))
    monkeypatch.setenv("JOBSYNCD_SERVER_AUDIO_DIR", str(tmp_path / "audio"))
    monkeypatch.setenv("JOBSYNCD_SERVER_MAX_UPLOAD_BYTES", "1234")
    app = create_app()
    assert app.max_upload_bytes == 1234
    assert app.tokens is None
    assert (tmp_path / "x.sqlite3").exists() and (tmp_path / "audio").is_dir()


def test_the_packaged_openapi_file_equals_docs_openapi_yaml() -> None:
    docs = (ROOT / "docs" / "openapi.yaml").read_bytes()
    packaged = (ROOT / "jobsyncd" / "server" / "openapi.yaml").read_bytes()
    assert packaged == docs, "copy docs/openapi.yaml to jobsyncd/server/openapi.yaml"


def test_the_openapi_file_is_valid_openapi_3_1() -> None:
    import yaml

    document = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/api/v1/jobs",
        "/api/v1/jobs/{id}",
        "/api/v1/changes",
        "/api/v1/batch",
        "/api/v1/uploads",
        "/api/v1/uploads/{id}",
    }


def test_gunicorn_serves_the_app_factory_with_settings_from_the_environment(
    tmp_path: Path,
) -> None:
    import os
    import re
    import shutil
    import subprocess
    import sys
    import time

    import requests

    pytest.importorskip("gunicorn")
    gunicorn = Path(sys.executable).parent / "gunicorn"
    if not gunicorn.exists():
        gunicorn = Path(shutil.which("gunicorn") or "gunicorn")
    env = {
        **os.environ,
        "JOBSYNCD_SERVER_DB": str(tmp_path / "g.sqlite3"),
        "JOBSYNCD_SERVER_AUDIO_DIR": str(tmp_path / "g-audio"),
    }
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [str(gunicorn), "-b", "127.0.0.1:0", "-w", "2", "jobsyncd.server:create_app()"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 20
        match = None
        while time.monotonic() < deadline and match is None:
            match = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log.read_text())
            time.sleep(0.05)
        assert match, log.read_text()
        url = f"{match.group(1)}/api/v1/jobs"
        created = requests.post(url, json={"local_id": str(uuid.uuid4())}, timeout=10)
        assert created.status_code == 201
        assert requests.get(url, timeout=10).json()["jobs"] == [created.json()]
        assert (tmp_path / "g.sqlite3").exists()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
