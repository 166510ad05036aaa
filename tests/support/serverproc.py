"""Helpers of the server tests: run the installed `jobsyncd-server` as a real process."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

START_DEADLINE = 20.0


def server_script() -> str:
    beside = Path(sys.executable).parent / "jobsyncd-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("jobsyncd-server")
    if found is None:
        pytest.fail("jobsyncd-server is not installed (pip install -e .)")
    return found


@dataclasses.dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    url: str
    workdir: Path
    log: Path
    db: Path  # the SQLite file (or, on PostgreSQL, the path it would have had: see db_url)
    audio_dir: Path
    token: str | None = None
    db_url: str | None = None  # the PostgreSQL URL when the server runs on PostgreSQL

    @property
    def changes_url(self) -> str:
        return f"{self.url}/api/v1/changes"

    @property
    def jobs_url(self) -> str:
        return f"{self.url}/api/v1/jobs"

    def session(self, token: str | None = None) -> requests.Session:
        session = requests.Session()
        token = token or self.token
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        return session

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    workdir: Path,
    *args: str,
    token: str | None = None,
    env: dict[str, str] | None = None,
    db_url: str | None = None,
) -> RunningServer:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"server-{uuid.uuid4().hex[:8]}.log"
    db, audio = workdir / "jobs.sqlite3", workdir / "audio"
    base = ["--port", "0"]
    if "--db" not in args:
        base += ["--db", db_url or str(db)]
    if "--audio-dir" not in args:
        base += ["--audio-dir", str(audio)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSYNCD_SERVER_")}
    full_env.update(env or {})
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [server_script(), *base, *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=workdir,
            env=full_env,
        )
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if match:
            return RunningServer(process, match.group(1), workdir, log, db, audio, token, db_url)
        if process.poll() is not None:
            pytest.fail(f"jobsyncd-server exited {process.returncode}: {log.read_text()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("jobsyncd-server did not start in time")


def new_job(session: requests.Session, url: str, **fields: object) -> dict[str, object]:
    body = {"local_id": str(uuid.uuid4()), "text": "hello", "metadata": {}, **fields}
    answer = session.post(url, json=body, timeout=10)
    assert answer.status_code == 201, answer.text
    return answer.json()


def gunicorn_script() -> str:
    beside = Path(sys.executable).parent / "gunicorn"
    if beside.exists():
        return str(beside)
    found = shutil.which("gunicorn")
    if found is None:
        pytest.fail("gunicorn is not installed (pip install -e '.[test]')")
    return found


def start_gunicorn(
    workdir: Path,
    db_url: str | None = None,
    workers: int = 4,
    threads: int = 8,
    env: dict[str, str] | None = None,
) -> RunningServer:
    """Real gunicorn with several gthread workers serving create_app() (settings by env)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"gunicorn-{uuid.uuid4().hex[:8]}.log"
    db, audio = workdir / "jobs.sqlite3", workdir / "audio"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSYNCD_SERVER_")}
    full_env.update(
        {"JOBSYNCD_SERVER_DB": db_url or str(db), "JOBSYNCD_SERVER_AUDIO_DIR": str(audio)}
    )
    full_env.update(env or {})
    command = [
        gunicorn_script(),
        "-b",
        "127.0.0.1:0",
        "-w",
        str(workers),
        "-k",
        "gthread",
        "--threads",
        str(threads),
        "--timeout",
        "120",
        "jobsyncd.server:create_app()",
    ]
    with open(log, "wb") as err:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=err, cwd=workdir, env=full_env
        )
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        text = log.read_text()
        match = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", text)
        if match and text.count("Booting worker") >= workers:
            return RunningServer(process, match.group(1), workdir, log, db, audio, None, db_url)
        if process.poll() is not None:
            pytest.fail(f"gunicorn exited {process.returncode}: {text}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("gunicorn did not start in time")
