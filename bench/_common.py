"""Helpers shared by the bench scripts: the installed commands, stores built fast, a server."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
JOBSYNCD = str(BIN / "jobsyncd")
SERVER = str(BIN / "jobsyncd-server")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s; reaped either way."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def clean_env(data_dir: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSYNCD_")}
    env["JOBSYNCD_DATA_DIR"] = data_dir
    env["JOBSYNCD_CONFIG"] = os.devnull if False else _empty_config()
    env.update(extra)
    return env


_CONFIG: list[str] = []


def _empty_config() -> str:
    if not _CONFIG:
        fd, path = tempfile.mkstemp(suffix=".toml")
        os.close(fd)
        os.chmod(path, 0o600)
        _CONFIG.append(path)
    return _CONFIG[0]


def timed(
    cmd: list[str], env: dict[str, str] | None = None, runs: int = 15, check: bool = True
) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - start)
        if check and proc.returncode != 0:
            raise SystemExit(f"{cmd} failed: {proc.stderr.decode()}")
    return times


def peak_mib(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Peak resident memory of one run of `cmd` alone (measured by a wrapper process)."""
    measure = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", measure, *cmd], env=env, capture_output=True, text=True
    )
    return int(out.stdout.strip()) / 1024


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def build_store(data_dir: str, count: int, synced_ids: list[str] | None = None) -> list[str]:
    """Write a store of `count` jobs directly (as `jobsyncd create` would have, but fast)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from jobsyncd.model import Job, rfc3339, utc_now
    from jobsyncd.store import encode_record

    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    now = rfc3339(utc_now())
    ids = []
    with open(os.path.join(data_dir, "jobs.jsonl"), "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        for i in range(count):
            local_id = str(uuid.uuid4())
            job = Job(
                local_id=local_id,
                text=f"job number {i} with some dictated text",
                metadata={"n": i, "ward": "B"},
                created_at=now,
                updated_at=now,
                rev=1,
            )
            if synced_ids is not None:
                job.server_id = synced_ids[i]
                job.sync_status = "synced"
                job.server_status = "submitted"
                job.create_sent = True
                job.base = {"text": job.text, "metadata": job.metadata}
            fh.write(encode_record(job.record()))
            ids.append(local_id)
    return ids


class Server:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [
                SERVER,
                "--port",
                "0",
                "--db",
                os.path.join(self.workdir, "server.db"),
                "--audio-dir",
                os.path.join(self.workdir, "audio"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        for _ in range(50):
            line = self.proc.stderr.readline()
            match = re.search(r"listening on http://[^\s:]+:(\d+)", line)
            if match:
                self.url = f"http://127.0.0.1:{match.group(1)}"
                break
        if not self.url:
            raise SystemExit("jobsyncd-server did not start")
        import threading

        self.list_requests = 0

        def pump() -> None:
            for line in self.proc.stderr:
                if '"GET /api/v1/jobs' in line and '"GET /api/v1/jobs/' not in line:
                    self.list_requests += 1

        threading.Thread(target=pump, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
