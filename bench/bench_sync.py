"""Sync pass speed against the reference server on loopback, with its floor measured in the same run.

Measures: the floor (a bare loop of N keep-alive POSTs with requests to the same server); pushing
N new jobs with `jobsyncd sync` (jobs/s); a no-change `jobsyncd sync` with N synced jobs (whole
process, median); a no-change pass over 100,000 synced jobs (whole process, requests counted
from the server log) and its peak memory.
Targets (issue 4): push >= 80% of the floor; no-change sync of 10,000 < 0.25 s; no-change pass of
100,000 < 1 s with one request for the pull; peak memory < 150 MiB.
Run: .venv/bin/python bench/bench_sync.py [--jobs 10000] [--big 100000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid

from _common import JOBSYNCD, Server, build_store, clean_env, median_ms, peak_mib, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    args = parser.parse_args()
    import requests

    with tempfile.TemporaryDirectory() as tmp:
        server = Server(tmp).start()
        try:
            session = requests.Session()
            start = time.perf_counter()
            for i in range(args.jobs):
                r = session.post(
                    server.url + "/api/v1/jobs",
                    json={
                        "local_id": str(uuid.uuid4()),
                        "text": f"floor {i}",
                        "metadata": {"n": i},
                    },
                    timeout=10,
                )
                r.raise_for_status()
            floor = args.jobs / (time.perf_counter() - start)
            print(f"floor: bare keep-alive POST loop, {args.jobs} POSTs: {floor:.0f} POSTs/s")

            data = os.path.join(tmp, "data")
            build_store(data, args.jobs)
            env = clean_env(data, JOBSYNCD_SERVER_URL=server.url)
            start = time.perf_counter()
            proc = subprocess.run(
                [JOBSYNCD, "sync", "--json"], env=env, capture_output=True, text=True
            )
            took = time.perf_counter() - start
            assert proc.returncode == 0, proc.stderr
            rate = args.jobs / took
            print(
                f"push {args.jobs} new jobs with `jobsyncd sync`: {took:.2f} s, {rate:.0f} jobs/s ({rate / floor:.0%} of the floor)"
            )
            timed([JOBSYNCD, "sync"], env, runs=1)  # the first no-change pass lists everything once
            nochange = median_ms(timed([JOBSYNCD, "sync"], env, runs=7))
            print(
                f"no-change `jobsyncd sync` with {args.jobs} synced jobs (whole process, median): {nochange:.0f} ms"
            )
        finally:
            server.stop()

    with tempfile.TemporaryDirectory() as tmp:
        # The server and the store hold the same 100,000 jobs, written straight into both.
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
        from jobsyncd.server.storage import Storage

        storage = Storage(os.path.join(tmp, "server.db"))
        import json as _json

        ids = []
        local_ids = [str(uuid.uuid4()) for _ in range(args.big)]
        for i, local_id in enumerate(local_ids):
            job_json, _ = storage.create_job(
                "default",
                local_id,
                f"job number {i} with some dictated text",
                {"n": i, "ward": "B"},
                None,
            )
            ids.append(_json.loads(job_json)["id"])
        storage.close()
        server = Server(tmp).start()
        try:
            data = os.path.join(tmp, "data")
            build_store(data, args.big, synced_ids=ids)
            env = clean_env(data, JOBSYNCD_SERVER_URL=server.url)
            first_peak = peak_mib([JOBSYNCD, "sync"], env)
            print(
                f"first pass over {args.big} synced jobs (a full listing): peak memory {first_peak:.0f} MiB"
            )
            time.sleep(0.2)
            listed = server.list_requests
            times = timed([JOBSYNCD, "sync"], env, runs=5)
            time.sleep(0.2)
            per_pass = (server.list_requests - listed) / 5
            print(
                f"no-change pass over {args.big} synced jobs (whole process, median): {median_ms(times):.0f} ms, "
                f"{per_pass:g} listing request(s) per pass"
            )
            print(
                f"peak memory of a no-change pass with {args.big} jobs: {peak_mib([JOBSYNCD, 'sync'], env):.0f} MiB"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
