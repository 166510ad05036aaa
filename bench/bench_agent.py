"""The agent against the reference server with the change feed and the batch endpoint (issues
13 and 14), each figure beside its floor or its other mode measured in the same run.

Measures:
- first sync of N new jobs in batches vs one request per job (the agent told the server has no
  batch endpoint), whole process, and its peak memory; 1,000 edits pushed in one pass, with N
  and with BIG jobs in the store (five passes at BIG, and their median); each
  batched first sync paired with Taskwarrior's `task sync init` of N new tasks run just before
  it, against a taskd on loopback (bench/_taskwarrior.py; needs `apt-get install taskwarrior
  taskd gnutls-bin`, else skipped with a line saying so);
- a pass after one server-side change with BIG synced jobs: feed mode vs listing mode (the agent
  told the server has no feed), whole process, and the feed pass's peak memory; a no-change pass;
- the daemon (live on, default interval): a server-side change to the local store, and a
  `jobsyncd create` to the server with creates a second apart (daemon CPU per create), at 1,000
  and BIG jobs; the idle daemon's CPU and memory with its long-poll open.

Run: .venv/bin/python bench/bench_agent.py [--jobs 10000] [--big 100000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import _taskwarrior
from _common import JOBSYNCD, Server, build_store, clean_env, median_ms, peak_mib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = "job number {} with some dictated text"


def seed_server(workdir: str, ids: list[str], local_ids: list[str]) -> None:
    """The server's database holding the same jobs as a store built by build_store()."""
    from jobsyncd.server.storage import SQLiteStorage, utc_now

    db = os.path.join(workdir, "server.db")
    SQLiteStorage(db).close()
    conn = sqlite3.connect(db)
    now = utc_now()
    with conn:
        conn.executemany(
            "INSERT INTO jobs (id, user, local_id, text, metadata, status, created_at, "
            "updated_at, change_seq) VALUES (?, 'default', ?, ?, ?, 'submitted', ?, ?, ?)",
            (
                (sid, lid, TEXT.format(i), json.dumps({"n": i, "ward": "B"}), now, now, i + 1)
                for i, (sid, lid) in enumerate(zip(ids, local_ids, strict=True))
            ),
        )
        conn.execute(
            "INSERT OR REPLACE INTO collections (user, version) VALUES ('default', ?)", (len(ids),)
        )
    conn.close()


def pretend(data: str, api: str, **state: object) -> None:
    """Tell the agent what it 'knows' of the server (pull_state.json), e.g. no batch endpoint."""
    path = os.path.join(data, "pull_state.json")
    current = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    current.update({"server": api, **state})
    Path(path).write_text(json.dumps(current))
    os.chmod(path, 0o600)


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr}")
    return took


def patch(url: str, server_id: str, fields: dict) -> None:
    import requests

    requests.patch(f"{url}/api/v1/jobs/{server_id}", json=fields, timeout=10).raise_for_status()


def push_bench(jobs: int, repeat: int = 1) -> None:
    """First sync of `jobs` new jobs in batches (`repeat` times, then the median) and one
    request per job (once), and 1,000 edits pushed in one pass after each batched first sync.
    With Taskwarrior and taskd installed, each batched first sync is paired with a `task sync
    init` of as many new tasks run just before it (issue 13: within 5x of it)."""
    firsts, edits, ratios, edit_ratios = [], [], [], []
    with tempfile.TemporaryDirectory() as twdir:
        peer = _taskwarrior.Taskwarrior(twdir, jobs) if _taskwarrior.available() else None
        if peer is None:
            print("Taskwarrior, taskd or certtool not installed: no `task sync` to pair with")
        try:
            _push_runs(jobs, repeat, firsts, edits, (ratios, edit_ratios), peer)
        finally:
            if peer is not None:
                peer.close()
    if repeat > 1:
        print(
            f"median of {repeat}: first sync {statistics.median(firsts):.2f} s, "
            f"1,000 edits {statistics.median(edits):.2f} s"
        )
    for what, pairs in (
        ("first sync over `task sync init` of as many tasks", ratios),
        ("1,000 edits over `task sync` of 1,000 edited tasks", edit_ratios),
    ):
        if pairs:
            print(
                f"{what}, median of {len(pairs)} pairs: {statistics.median(pairs):.2f}x "
                f"(each: {' '.join(f'{r:.2f}' for r in pairs)})"
            )


def _push_runs(
    jobs: int,
    repeat: int,
    firsts: list[float],
    edits: list[float],
    paired: tuple[list[float], list[float]],
    peer: _taskwarrior.Taskwarrior | None,
) -> None:
    ratios, edit_ratios = paired
    for mode in ["batch"] * repeat + ["single"]:
        with tempfile.TemporaryDirectory() as tmp:
            server = Server(tmp).start()
            try:
                data = os.path.join(tmp, "data")
                build_store(data, jobs)
                env = clean_env(data, JOBSYNCD_SERVER_URL=server.url)
                api = server.url + "/api/v1"
                if mode == "single":
                    pretend(data, api, batch={"offered": False, "checked_at": time.time()})
                task = peer.first_sync() if (peer is not None and mode == "batch") else None
                took = run([JOBSYNCD, "sync"], env)
                print(
                    f"first sync of {jobs} new jobs, {mode}: {took:.2f} s ({jobs / took:.0f} jobs/s)"
                )
                if task is not None:
                    ratios.append(took / task)
                    print(
                        f"  `task sync init` of {jobs} new tasks just before: {task:.2f} s "
                        f"({took / task:.2f}x)"
                    )
                if mode == "batch":
                    firsts.append(took)
                    took = edit_pass(data, env)
                    edits.append(took)
                    print(f"1,000 edits pushed in one pass (whole process): {took:.2f} s")
                    if peer is not None:
                        task = peer.edits_sync(1000)
                        edit_ratios.append(took / task)
                        print(f"  `task sync` of 1,000 edited tasks just after: {task:.2f} s")
            finally:
                server.stop()


EDIT_SCRIPT = (
    "import sys; from jobsyncd.store import Store; from jobsyncd.jobs import "
    "update_job; s = Store(sys.argv[1]); ids = sorted(s.load())[:1000]\n"
    "for i, lid in enumerate(ids): update_job(s, lid, f'edit {i} ' + sys.argv[2], None, {}, [])"
)


def edit_pass(data: str, env: dict[str, str], round_: int = 0) -> float:
    """1,000 jobs edited (as `jobsyncd update` would), then the pass that pushes them, timed
    as a whole process."""
    cmd = [sys.executable, "-c", EDIT_SCRIPT, data, str(round_)]
    subprocess.run(cmd, check=True, env=env)
    return run([JOBSYNCD, "sync"], env)


def push_memory(jobs: int, edit_rounds: int = 5) -> None:
    """First sync of `jobs` new jobs, its time and peak memory; with Taskwarrior installed,
    beside a `task sync init` of as many new tasks run just before it. Then `edit_rounds`
    passes of 1,000 edits each at that size (the issue's steady state, at the size users
    reach), and their median."""
    with tempfile.TemporaryDirectory() as tmp:
        peer = _taskwarrior.Taskwarrior(tmp, jobs) if _taskwarrior.available() else None
        server = Server(tmp).start()
        try:
            task = peer.first_sync() if peer is not None else None
            data = os.path.join(tmp, "data")
            build_store(data, jobs)
            env = clean_env(data, JOBSYNCD_SERVER_URL=server.url)
            start = time.perf_counter()
            peak = peak_mib([JOBSYNCD, "sync"], env)
            took = time.perf_counter() - start
            print(
                f"first sync of {jobs} new jobs in batches: {took:.1f} s, peak memory {peak:.0f} MiB"
            )
            if task is not None:
                print(
                    f"  `task sync init` of {jobs} new tasks just before: {task:.1f} s ({took / task:.2f}x)"
                )
            edits = [edit_pass(data, env, r) for r in range(edit_rounds)]
            print(
                f"1,000 edits pushed in one pass with {jobs} jobs in the store: median "
                f"{statistics.median(edits):.2f} s ({' '.join(f'{e:.2f}' for e in edits)})"
            )
            cmd = [sys.executable, "-c", EDIT_SCRIPT, data, "peak"]
            subprocess.run(cmd, check=True, env=env)
            print(f"  peak memory of such a pass: {peak_mib([JOBSYNCD, 'sync'], env):.0f} MiB")
        finally:
            server.stop()
            if peer is not None:
                peer.close()


def feed_bench(big: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ids = [str(uuid.uuid4()) for _ in range(big)]
        data = os.path.join(tmp, "data")
        local_ids = build_store(data, big, synced_ids=ids)
        seed_server(tmp, ids, local_ids)
        server = Server(tmp).start()
        try:
            env = clean_env(data, JOBSYNCD_SERVER_URL=server.url)
            api = server.url + "/api/v1"
            run([JOBSYNCD, "sync"], env)  # reads the feed from the beginning once
            times: dict[str, list[float]] = {"feed": [], "listing": []}
            state = json.loads(Path(data, "pull_state.json").read_text())
            for i in range(rounds):
                for mode in ("feed", "listing"):
                    if mode == "listing":
                        pretend(data, api, feed={"offered": False, "checked_at": time.time()})
                    else:
                        pretend(data, api, feed=state["feed"])
                    patch(server.url, ids[(i * 7919) % big], {"status": f"{mode} {i}"})
                    times[mode].append(run([JOBSYNCD, "sync"], env))
                    if mode == "feed":
                        state = json.loads(Path(data, "pull_state.json").read_text())
            feed, listing = median_ms(times["feed"]), median_ms(times["listing"])
            print(
                f"pass after one server-side change, {big} synced jobs (whole process, median of "
                f"{rounds}): feed {feed:.0f} ms, listing {listing:.0f} ms ({feed / listing:.1%})"
            )
            pretend(data, api, feed=state["feed"])
            patch(server.url, ids[1], {"status": "for the memory run"})
            print(f"peak memory of that feed pass: {peak_mib([JOBSYNCD, 'sync'], env):.0f} MiB")
            nochange = [run([JOBSYNCD, "sync"], env) for _ in range(5)]
            print(f"no-change pass, {big} jobs, feed mode: {median_ms(nochange):.0f} ms")
        finally:
            server.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_for(predicate, timeout: float = 30.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if predicate():
            return time.perf_counter() - start
        time.sleep(0.005)
    raise SystemExit("timed out")


def daemon_bench(count: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ids = [str(uuid.uuid4()) for _ in range(count)]
        data = os.path.join(tmp, "data")
        local_ids = build_store(data, count, synced_ids=ids)
        seed_server(tmp, ids, local_ids)
        server = Server(tmp).start()
        store = Path(data, "jobs.jsonl")
        daemon = None
        try:
            env = clean_env(data, JOBSYNCD_SERVER_URL=server.url)
            run([JOBSYNCD, "sync"], env)
            daemon = subprocess.Popen(
                [JOBSYNCD, "daemon"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(3)  # started, its first pass done, the long-poll open
            lags = []
            for i in range(rounds):
                size = store.stat().st_size
                marker = f"live-{i}-{uuid.uuid4().hex[:6]}"
                start = time.perf_counter()
                patch(server.url, ids[(i * 104729) % count], {"status": marker})

                def arrived(size: int = size, marker: str = marker) -> bool:
                    if store.stat().st_size == size:
                        return False
                    with open(store, "rb") as fh:
                        fh.seek(max(0, store.stat().st_size - 65536))
                        return marker.encode() in fh.read()

                wait_for(arrived)
                lags.append(time.perf_counter() - start)
                time.sleep(0.3)
            lags.sort()
            print(
                f"server-side change to the local store, daemon live, {count} jobs: median "
                f"{statistics.median(lags) * 1000:.0f} ms, p95 {lags[int(0.95 * (len(lags) - 1))] * 1000:.0f} ms"
            )
            db = sqlite3.connect(f"file:{os.path.join(tmp, 'server.db')}?mode=ro", uri=True)
            lags, cpu = [], []
            for i in range(rounds):
                before = cpu_seconds(daemon.pid)
                start = time.perf_counter()
                out = subprocess.run(
                    [JOBSYNCD, "create", "--text", f"create {i}"],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                local_id = out.stdout.strip()
                wait_for(
                    lambda lid=local_id: (
                        db.execute("SELECT 1 FROM jobs WHERE local_id = ?", (lid,)).fetchone()
                        is not None
                    )
                )
                lags.append(time.perf_counter() - start)
                time.sleep(max(0.0, 1.0 - (time.perf_counter() - start)))
                cpu.append(cpu_seconds(daemon.pid) - before)
            print(
                f"create to server, daemon live, {count} jobs, a create a second: median "
                f"{statistics.median(lags) * 1000:.0f} ms, daemon CPU per create "
                f"{statistics.median(cpu) * 1000:.0f} ms"
            )
            time.sleep(2)
            before, start = cpu_seconds(daemon.pid), time.perf_counter()
            time.sleep(20)
            share = (cpu_seconds(daemon.pid) - before) / (time.perf_counter() - start)
            print(
                f"idle daemon with a long-poll open, {count} jobs: {share:.2%} of a core, "
                f"{rss_mib(daemon.pid):.0f} MiB"
            )
        finally:
            if daemon is not None:
                daemon.terminate()
                daemon.wait(10)
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--only", choices=["push", "feed", "daemon"], default=None)
    parser.add_argument("--repeat", type=int, default=1, help="batched first syncs to run")
    args = parser.parse_args()
    if args.only in (None, "push"):
        push_bench(args.jobs, args.repeat)
        push_memory(args.big)
    if args.only in (None, "feed"):
        feed_bench(args.big, max(3, args.rounds // 4))
    if args.only in (None, "daemon"):
        daemon_bench(1_000, args.rounds)
        daemon_bench(args.big, args.rounds)


if __name__ == "__main__":
    main()
