"""`jobsyncd demo`: the whole loop against a throw-away reference server, narrated for a person.

Everything lives in a temporary directory (its own data dir, config and server database); the
configured server and data dir are ignored, and every process it starts is stopped at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Callable
from typing import Any

import click

PY = sys.executable


def _say(text: str) -> None:
    click.echo(click.style("==> ", bold=True) + text)


def _show(output: str) -> None:
    for line in output.rstrip("\n").splitlines():
        click.echo("    " + line)


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise click.ClickException(f"demo: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - start


def _make_wav(path: str) -> None:
    rate = 8000
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        frames = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
            for i in range(rate // 2)
        )
        wav.writeframes(frames)


class _Demo:
    def __init__(self, root: str) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSYNCD_")}
        for name in (
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "CREDENTIALS_DIRECTORY",
            "STATE_DIRECTORY",
        ):
            self.env.pop(name, None)
        config = os.path.join(root, "config.toml")
        with open(
            os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8"
        ) as fh:
            fh.write("# the demo's own config: nothing of yours is read or touched\n")
        self.env.update(
            {
                "JOBSYNCD_CONFIG": config,
                "JOBSYNCD_DATA_DIR": os.path.join(root, "data"),
                "JOBSYNCD_BACKOFF_BASE_SECONDS": "1",
            }
        )
        self.url = ""

    def jobsyncd(self, *args: str) -> str:
        proc = subprocess.run(
            [PY, "-c", "from jobsyncd.cli import main; main()", *args],
            check=False,  # the exit code is checked below, with the command's stderr
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise click.ClickException(
                f"demo: `jobsyncd {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc.stdout

    def start_server(self) -> None:
        server = subprocess.Popen(
            [
                PY,
                "-c",
                "from jobsyncd.server.cli import main; main()",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--db",
                os.path.join(self.root, "server", "jobs.db"),
                "--audio-dir",
                os.path.join(self.root, "server", "audio"),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(server)
        assert server.stderr is not None
        stderr = server.stderr  # bound so the drain thread below sees it narrowed
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = stderr.readline()
            if not line:
                break
            match = re.search(r"listening on http://[^\s:]+:(\d+)", line)
            if match:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                break
        if not self.url:
            raise click.ClickException("demo: the reference server did not start")
        threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
        self.env["JOBSYNCD_SERVER_URL"] = self.url

    def start_daemon(self) -> subprocess.Popen[bytes]:
        log_path = os.path.join(self.root, "daemon.log")
        self.daemon_log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        daemon = subprocess.Popen(
            [PY, "-c", "from jobsyncd.cli import main; main()", "daemon", "--interval", "60"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.daemon_log,
        )
        self.procs.append(daemon)
        return daemon

    def server_jobs(self) -> list[dict[str, Any]]:
        import requests  # costs start-up time; only the demo and the sync pass need it

        jobs: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(1000):
            params: dict[str, str] = {"cursor": cursor} if cursor else {}
            page = requests.get(self.url + "/api/v1/jobs", params=params, timeout=5).json()
            jobs += page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return jobs

    def local_jobs(self) -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for line in self.jobsyncd("list", "--json").splitlines()
            if line.strip()
        ]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if getattr(self, "daemon_log", None):
            self.daemon_log.close()


def run_demo() -> int:
    started = time.monotonic()
    root = tempfile.mkdtemp(prefix="jobsyncd-demo-")
    demo = _Demo(root)
    try:
        _say(f"Everything happens in {root}; your own config and jobs are not touched.")
        demo.start_server()
        _say(
            f"Started the reference job server at {demo.url} (SQLite, in the temporary directory)."
        )
        daemon = demo.start_daemon()
        _say(
            f"Started `jobsyncd daemon` (pid {daemon.pid}) with a 60 s interval, so every quick sync"
        )
        _say("below comes from the wake-up that each command sends, not from the schedule.")
        _wait(
            lambda: os.path.exists(os.path.join(root, "data", "daemon.sock")),
            15,
            "the daemon start",
        )

        audio = os.path.join(root, "dictation.wav")
        _make_wav(audio)
        _say("Creating three jobs (one with a half-second audio file):")
        t0 = time.monotonic()
        ids = [
            demo.jobsyncd(
                "create", "--text", "Letter to Dr. Patel", "--meta", "priority=1"
            ).strip(),
            demo.jobsyncd("create", "--text", "Discharge summary", "--audio", audio).strip(),
            demo.jobsyncd("create", "--text", "Lab results memo", "--meta", 'ward="B"').strip(),
        ]
        _show("\n".join(f"jobsyncd create ... -> {i}" for i in ids))
        took = _wait(lambda: len(demo.server_jobs()) == 3, 20, "the jobs reaching the server")
        _say(
            f"All three are on the server {time.monotonic() - t0:.2f} s after the first create ({took:.2f} s after the last):"
        )
        _wait(
            lambda: all(j["sync_status"] == "synced" for j in demo.local_jobs()),
            20,
            "the jobs being marked synced",
        )
        _show(demo.jobsyncd("list"))

        _say(
            f"Editing a job locally: jobsyncd update {ids[0][:8]} --text 'Letter to Dr. Patel (signed)'"
        )
        demo.jobsyncd(
            "update", ids[0][:8], "--text", "Letter to Dr. Patel (signed)", "--meta", "signed=true"
        )
        _wait(
            lambda: any(j["text"].endswith("(signed)") for j in demo.server_jobs()),
            20,
            "the edit reaching the server",
        )
        _say("The server has the edit:")
        edited = next(j for j in demo.server_jobs() if j["text"].endswith("(signed)"))
        _show(json.dumps({k: edited[k] for k in ("id", "local_id", "text", "metadata", "status")}))

        import requests

        mark = next(j for j in demo.local_jobs() if j["local_id"] == ids[1])
        _say(
            f"A server-side tool marks job {mark['server_id']} as transcribed (an HTTP PATCH, not "
            "jobsyncd). The idle daemon holds a long-poll on the server's change feed, so the"
        )
        _say("change reaches this machine at once, not at the next 60 s pass:")
        t0 = time.monotonic()
        requests.patch(
            f"{demo.url}/api/v1/jobs/{mark['server_id']}",
            json={"status": "transcribed"},
            timeout=5,
        )
        _wait(
            lambda: any(
                j["local_id"] == ids[1] and j["server_status"] == "transcribed"
                for j in demo.local_jobs()
            ),
            20,
            "the server-side change reaching the agent",
        )
        _say(f"jobsyncd show {ids[1][:8]} shows it {time.monotonic() - t0:.2f} s later:")
        _show(demo.jobsyncd("show", ids[1][:8]))

        victim = next(j for j in demo.local_jobs() if j["local_id"] == ids[2])
        _say(
            f"Someone deletes job {victim['server_id']} on the server (an HTTP DELETE, not jobsyncd)."
        )
        requests.delete(f"{demo.url}/api/v1/jobs/{victim['server_id']}", timeout=5)
        _say("`jobsyncd sync` hands the pass to the running daemon, which notices the deletion:")
        _show(demo.jobsyncd("sync"))
        _wait(
            lambda: all(j["local_id"] != ids[2] for j in demo.local_jobs()),
            20,
            "the daemon noticing the deletion",
        )
        _show(demo.jobsyncd("list"))

        _say("`jobsyncd status`:")
        _show(demo.jobsyncd("status"))
        _say("The daemon's log (one line per start, pass and stop):")
        demo.stop()
        with open(os.path.join(root, "daemon.log"), encoding="utf-8") as fh:
            _show(fh.read())
    finally:
        demo.stop()
        shutil.rmtree(root, ignore_errors=True)
    _say(
        f"Stopped the daemon and the server and removed {root}. The demo took {time.monotonic() - started:.1f} s."
    )
    _say("Next: `jobsyncd --help`, and README.md for configuration and running it as a service.")
    return 0
