"""Daemon figures: create-to-server latency with a 60 s interval, idle CPU and memory.

Latency: from starting `jobsyncd create` to the job being in the server's listing, median of 20
(the periodic pass alone would give 7.5 s on average with the default 15 s interval).
Idle: CPU share and resident memory of a daemon with 100,000 jobs in its store, over 30 s.
Targets (issue 5): latency < 0.5 s; idle < 1% of a core and < 60 MiB resident.
Run: .venv/bin/python bench/bench_daemon.py [--samples 20] [--big 100000] [--idle-seconds 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

from _common import JOBSYNCD, Server, build_store, clean_env, stop_process


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _start_daemon(env: dict[str, str], data: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [JOBSYNCD, "daemon", "--interval", "60"], env=env, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(data, "daemon.sock")):
        if time.monotonic() > deadline:
            raise SystemExit("the daemon did not start")
        time.sleep(0.01)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    import requests

    with tempfile.TemporaryDirectory() as tmp:
        server = Server(tmp).start()
        data = os.path.join(tmp, "data")
        env = clean_env(data, JOBSYNCD_SERVER_URL=server.url)
        daemon = _start_daemon(env, data)
        try:
            session = requests.Session()
            latencies = []
            for i in range(args.samples):
                text = f"latency probe {i}"
                start = time.perf_counter()
                subprocess.run(
                    [JOBSYNCD, "create", "--text", text],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                deadline = start + 30
                while True:
                    page = session.get(
                        server.url + "/api/v1/jobs", params={"limit": 5000}, timeout=10
                    ).json()
                    if any(j["text"] == text for j in page["jobs"]):
                        break
                    if time.perf_counter() > deadline:
                        raise SystemExit("a job did not reach the server within 30 s")
                    time.sleep(0.005)
                latencies.append(time.perf_counter() - start)
            print(
                f"create-to-server latency with a 60 s interval: median {statistics.median(latencies) * 1000:.0f} ms, "
                f"max {max(latencies) * 1000:.0f} ms over {args.samples}"
            )
        finally:
            stop_process(daemon)
            server.stop()

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        build_store(data, args.big, synced_ids=[f"s{i}" for i in range(args.big)])
        # Synced jobs and an unreachable server: nothing to push, the pull is skipped: idle is idle.
        env = clean_env(data, JOBSYNCD_SERVER_URL="http://127.0.0.1:9")
        daemon = _start_daemon(env, data)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(data, "last_pass.json")):  # the pass at start
                if time.monotonic() > deadline:
                    raise SystemExit("the daemon's first pass did not end")
                time.sleep(0.05)
            time.sleep(1)
            cpu0, t0 = _cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(args.idle_seconds)
            cpu = (_cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0)
            print(
                f"idle daemon with {args.big} jobs in its store: {cpu:.2%} of a core, {_rss_mib(daemon.pid):.0f} MiB resident"
            )
        finally:
            stop_process(daemon)


if __name__ == "__main__":
    main()
