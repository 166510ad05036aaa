"""Helpers shared by the tests: the installed commands, a private CLI runner, the reference server
as a process, and `poll`. Import them as `from helpers import ...` (`conftest` is ambiguous: the
server tests have a conftest of their own).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
    return found


def poll(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
) -> object:
    """Return predicate()'s first truthy value, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)


class Cli:
    """Runs the installed `jobsyncd` with a private data dir and environment."""

    def __init__(self, binary: str, data_dir: Path, home: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("JOBSYNCD_")
            and k
            not in (
                "NOTIFY_SOCKET",
                "WATCHDOG_USEC",
                "WATCHDOG_PID",
                "JOURNAL_STREAM",
                "CREDENTIALS_DIRECTORY",
                "STATE_DIRECTORY",
            )
        }
        self.env.update(
            {
                "HOME": str(home),
                "XDG_CONFIG_HOME": str(home / ".config"),
                "XDG_DATA_HOME": str(home / ".local" / "share"),
                "JOBSYNCD_DATA_DIR": str(data_dir),
                "JOBSYNCD_BACKOFF_BASE_SECONDS": "0",
                "JOBSYNCD_REQUEST_TIMEOUT_SECONDS": "5",
            }
        )

    def __call__(
        self, *args: str, check: bool | int = False, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.binary, *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check is not False:
            want = 0 if check is True else check
            assert proc.returncode == want, (
                f"jobsyncd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def json(self, *args: str) -> object:
        proc = self(*args, "--json", check=True)
        return json.loads(proc.stdout)

    def jobs(self) -> list[dict]:
        proc = self("list", "--json", check=True)
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([self.binary, *args], env=self.env, text=True, **kwargs)


class RefServer:
    """The reference server as a real process on a free loopback port."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        token_file: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.token_file = token_file
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.port = 0

    def start(self, port: int = 0) -> RefServer:
        args = [
            self.binary,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--db",
            str(self.workdir / "server.db"),
            "--audio-dir",
            str(self.workdir / "server-audio"),
        ]
        if self.token_file:
            args += ["--token-file", str(self.token_file)]
        args += list(self.extra)
        self.log = open(self.workdir / "server.log", "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 15
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.write(line)
            match = re.search(r"listening on (http://[^\s]+):(\d+)", line)
            if match:
                self.port = int(match.group(2))
                self.url = f"http://127.0.0.1:{self.port}"
                break
        if not self.url:
            self.stop()
            raise AssertionError("jobsyncd-server did not start")
        # Keep reading its log so that the pipe never fills.
        import threading

        def pump(stream, sink):
            for line in stream:
                try:
                    sink.write(line)
                    sink.flush()
                except ValueError:
                    return

        threading.Thread(target=pump, args=(self.proc.stderr, self.log), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def jobs(self, token: str | None = None) -> list[dict]:
        import requests

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        out, cursor = [], None
        for _ in range(10_000):
            params = {"limit": 5000}
            if cursor:
                params["cursor"] = cursor
            page = requests.get(
                self.url + "/api/v1/jobs", params=params, headers=headers, timeout=10
            ).json()
            out += page["jobs"]
            cursor = page["next_cursor"]
            if not cursor:
                return out
        raise AssertionError("listing did not end")


def sync_json(cli: Cli, *extra: str, want: int | None = None) -> tuple[int, dict, str]:
    """Run `jobsyncd sync --json`; return (exit code, summary, stderr). No traceback, ever."""
    proc = cli("sync", "--json", *extra)
    assert proc.stdout.strip(), f"no summary (exit {proc.returncode}): {proc.stderr}"
    summary = json.loads(proc.stdout)
    if want is not None:
        assert proc.returncode == want, f"{proc.returncode} != {want}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.returncode, summary, proc.stderr


def jobs_by_id(cli: Cli) -> dict[str, dict]:
    return {j["local_id"]: j for j in cli.jobs()}
