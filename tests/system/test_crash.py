"""Crash consistency: `jobsyncd` processes SIGKILLed at random instants never lose or duplicate a job.

A seeded harness (random.Random(JOBSYNCD_CRASH_SEED)) starts `create`, `update`, `delete`,
`compact`, `sync` and `daemon --interval 1` against the reference server and SIGKILLs them at random
instants, tracking the ground truth: a create that exited 0 printed a local_id that must never be
lost, a delete that exited 0 must be gone everywhere after the next normal pass, an update that
exited 0 decides the text (a killed one may or may not have). After every kill the store must
load and hold every job it should; every few kills a normal `jobsyncd sync` (retried until it
exits 0) must leave the local store and the server holding exactly the same jobs, each once.

Some creates and updates carry audio of 0.5-2 MiB, more than `upload_chunk_bytes` (64 KiB
here), so that it goes up as a resumable upload (contract 6.8) and many kills land in the middle
of one: after every normal pass each job's audio on the server has the sha256 of its audio here
(one the ground truth allows), the server's audio dir holds one file per job with audio, and at
the end, after the server's expiry sweep as it would run a day later, no upload is left.

CI runs about 60 kills; a long run: JOBSYNCD_CRASH_KILLS=500 JOBSYNCD_CRASH_SEED=7 pytest -s ...
The same harness also runs with every killed command talking to the server through a proxy that
loses answers after the server applied the request and trickles others (tests/support/lossyproxy.py);
the checking passes go to the server directly.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import poll
from lossyproxy import LossyProxy

from jobsyncd.model import Job, new_local_id
from jobsyncd.server.uploads import SUBDIR, UploadStore
from jobsyncd.store import STORE_NAME, TMP_NAME, Store, prepare_data_dir

KILLS = int(os.environ.get("JOBSYNCD_CRASH_KILLS", "60"))
SEED = int(os.environ.get("JOBSYNCD_CRASH_SEED", "20240611"))
FULL_CHECK_EVERY_KILLS = 3
MAX_LIVE_JOBS = 30  # keeps passes short: deletes get likelier as the store grows
UPLOAD_CHUNK = 65536  # the smallest upload_chunk_bytes: every audio here goes up by tus
AUDIO_SHARE = 0.25  # of creates and updates
AUDIO_BYTES = (512 << 10, 2 << 20)


@dataclasses.dataclass
class Truth:
    """What we know of one job that must not be lost."""

    texts: set[str]  # the texts it may hold (an update killed midway may or may not have landed)
    delete: str | None = None  # None, "maybe" (delete killed) or "acked" (delete exited 0)
    audio: set[str | None] = dataclasses.field(default_factory=lambda: {None})  # sha256s


@dataclasses.dataclass
class Outcome:
    rc: int | None  # None when we killed it
    stdout: str
    stderr: str


class Harness:
    def __init__(
        self, cli, server, rng: random.Random, workdir: Path, op_url: str | None = None
    ) -> None:
        self.cli = cli
        self.server = server
        # where the killed commands send their requests (a lossy proxy, or the server itself)
        self.op_url = op_url or server.url
        self.lossy = op_url is not None
        self.rng = rng
        self.workdir = workdir
        self.known: dict[str, Truth] = {}
        self.maybe_created: set[str] = set()  # texts of creates killed midway
        self.audio_of: dict[str, str] = {}  # sha256 of the audio each create's text came with
        self.audio_jobs = 0  # creates and updates that carried audio
        self.mid_upload = 0  # kills after which a job's record holds an upload in progress
        self.kills = 0
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.kills_since_check = 0
        self.full_checks = 0
        self.counter = 0
        self.log: list[str] = []
        self.daemon_logs: list[Path] = []

    # ---- running and killing ----------------------------------------------------------------
    def start(self, *args: str) -> subprocess.Popen:
        return self.cli.popen(
            "--server", self.op_url, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def kill_after(self, proc: subprocess.Popen, delay: float, kind: str) -> bool:
        """SIGKILL `proc` after `delay` seconds unless it has exited; True if the kill hit it."""
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            pass
        hit = proc.poll() is None
        if hit:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if hit:
            self.kills += 1
            self.kills_since_check += 1
            self.by_kind[kind] += 1
        return hit

    def run_killed(
        self, args: tuple[str, ...], max_delay: float, min_delay: float = 0.0
    ) -> Outcome:
        proc = self.start(*args)
        try:
            hit = self.kill_after(proc, self.rng.uniform(min_delay, max_delay), args[0])
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        rc = None if hit else proc.returncode
        self.log.append(f"{args[0]} {'killed' if hit else f'-> {rc}'}")
        if rc is not None:
            assert "Traceback" not in err, f"jobsyncd {' '.join(args)}:\n{err}"
        return Outcome(rc, out, err)

    def next_text(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}-{self.counter}-{self.rng.randrange(10**9)}"

    def live(self) -> list[str]:
        return sorted(lid for lid, t in self.known.items() if t.delete is None)

    def new_audio(self, always: bool = False) -> tuple[list[str], str | None]:
        """`--audio FILE` for a share of the creates and updates (the agent copies the file),
        and its sha256; else no option and None."""
        if not always and self.rng.random() >= AUDIO_SHARE:
            return [], None
        data = self.rng.randbytes(self.rng.randrange(*AUDIO_BYTES))
        path = self.workdir / f"audio-{self.counter}.wav"
        path.write_bytes(data)
        self.audio_jobs += 1
        return ["--audio", str(path)], hashlib.sha256(data).hexdigest()

    # ---- the operations -----------------------------------------------------------------------
    def op_create(
        self, max_delay: float = 0.12, audio_always: bool = False, min_delay: float = 0.0
    ) -> str | None:
        """Returns the new job's local_id when the create exited 0."""
        text = self.next_text("c")
        audio, digest = self.new_audio(audio_always)
        out = self.run_killed(("create", "--text", text, *audio), max_delay, min_delay)
        if digest is not None:
            self.audio_of[text] = digest
        if out.rc is None:
            self.maybe_created.add(text)
            return None
        assert out.rc == 0, out.stderr
        local_id = out.stdout.strip()
        assert local_id not in self.known
        self.known[local_id] = Truth({text}, audio={digest})
        return local_id

    def op_update(self, max_delay: float = 0.12) -> None:
        live = self.live()
        if not live:
            self.op_create(max_delay)
            return
        local_id = self.rng.choice(live)
        text = self.next_text("u")
        audio, digest = self.new_audio()
        out = self.run_killed(("update", local_id, "--text", text, *audio), max_delay)
        truth = self.known[local_id]
        if out.rc is None:
            truth.texts.add(text)
            if digest is not None:
                truth.audio.add(digest)
            return
        assert out.rc == 0, f"update of a live job {local_id} -> {out.rc}: {out.stderr}"
        truth.texts = {text}
        if digest is not None:
            truth.audio = {digest}

    def op_delete(self, max_delay: float = 0.12) -> None:
        live = self.live()
        if not live:
            self.op_create(max_delay)
            return
        local_id = self.rng.choice(live)
        out = self.run_killed(("delete", local_id), max_delay)
        if out.rc is None:
            self.known[local_id].delete = "maybe"
            return
        assert out.rc == 0, f"delete of a live job {local_id} -> {out.rc}: {out.stderr}"
        assert out.stdout.strip() == local_id
        self.known[local_id].delete = "acked"

    def op_compact(self, max_delay: float = 0.12) -> None:
        out = self.run_killed(("compact",), max_delay)
        if out.rc is not None:
            assert out.rc == 0, out.stderr

    def op_local(self, max_delay: float = 0.12) -> None:
        n = len(self.live())
        weights = [3, 2, 1 + 3 * (n >= MAX_LIVE_JOBS // 2) + 6 * (n >= MAX_LIVE_JOBS), 0.5]
        ops = [self.op_create, self.op_update, self.op_delete, self.op_compact]
        self.rng.choices(ops, weights)[0](max_delay)

    def op_sync(self, max_delay: float = 0.5) -> None:
        out = self.run_killed(("sync",), max_delay)
        if out.rc is not None:
            # Through the lossy proxy a pass may end with errored jobs (lost answers: exit 1).
            assert out.rc in ((0, 1) if self.lossy else (0,)), out.stderr

    def op_daemon(self) -> None:
        """A daemon runs passes (at start, every second, on wake-ups) while CLI commands change
        the store under it; then it is SIGKILLed at a random instant."""
        log_path = self.workdir / f"daemon-{len(self.daemon_logs)}.log"
        self.daemon_logs.append(log_path)
        with open(log_path, "w") as log:
            proc = self.cli.popen(
                "--server",
                self.op_url,
                "daemon",
                "--interval",
                "1",
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            deadline = time.monotonic() + self.rng.uniform(0.1, 2.0)
            for _ in range(self.rng.randrange(4)):
                if time.monotonic() >= deadline:
                    break
                time.sleep(self.rng.uniform(0.0, 0.3))
                # Some of these complete and wake the daemon; some are killed themselves.
                self.op_local(max_delay=self.rng.choice([0.12, 1.0]))
            self.kill_after(proc, max(0.0, deadline - time.monotonic()), "daemon")
            self.log.append("daemon killed")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    def op_upload(self) -> None:
        """A pass SIGKILLed in the middle of an upload: a job with audio for it to send
        (created whole), then the kill at a random instant once the job's record holds the
        upload (the pass has confirmed its first chunks). The next pass resumes it."""
        local_id = self.op_create(max_delay=30.0, audio_always=True, min_delay=30.0)
        assert local_id is not None  # not killed: it ends long before 30 s
        proc = self.start("sync")
        try:
            deadline = time.monotonic() + 5
            while proc.poll() is None and time.monotonic() < deadline:
                if self.upload_recorded(local_id):
                    break
                time.sleep(0.01)
            hit = self.kill_after(proc, self.rng.uniform(0.0, 0.1), "sync")
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.log.append(f"sync during an upload {'killed' if hit else f'-> {proc.returncode}'}")
        if not hit:
            assert proc.returncode in ((0, 1) if self.lossy else (0,)), err

    def upload_recorded(self, local_id: str) -> bool:
        """Does the job's latest record in the store hold an upload URL?"""
        latest = None
        with open(self.cli.data_dir / STORE_NAME, "rb") as f:
            for line in f:
                if local_id.encode() in line:
                    latest = line
        return latest is not None and b'"upload_url"' in latest

    def round(self) -> None:
        kind = self.rng.choices(["local", "sync", "daemon", "upload"], [6, 2, 1, 1])[0]
        if kind == "local":
            self.op_local()
        elif kind == "sync":
            if not self.live() or self.rng.random() < 0.5:
                self.op_local(max_delay=1.0)  # something for the pass to push
            self.op_sync()
        elif kind == "upload":
            self.op_upload()
        else:
            self.op_daemon()

    # ---- checks -------------------------------------------------------------------------------
    def local_jobs(self) -> dict[str, dict]:
        proc = self.cli("list", "--json")
        assert proc.returncode == 0, f"the store does not load after a kill:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        jobs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        ids = [j["local_id"] for j in jobs]
        assert len(ids) == len(set(ids)), f"a local_id is listed twice: {ids}"
        sids = [j["server_id"] for j in jobs if j["server_id"] is not None]
        dup = [s for s, c in collections.Counter(sids).items() if c > 1]
        assert not dup, f"several local jobs share the server_ids {dup}"
        return {j["local_id"]: j for j in jobs}

    def check_store(self) -> dict[str, dict]:
        """After a kill: the store loads and holds every job that must not be lost."""
        local = self.local_jobs()
        status = self.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        in_progress = json.loads(status.stdout)["uploads_in_progress"]
        assert all(u["local_id"] in local and u["offset"] >= 0 for u in in_progress), in_progress
        self.mid_upload += bool(in_progress)
        for local_id, truth in self.known.items():
            if truth.delete is not None:
                continue
            assert local_id in local, f"job {local_id} was lost locally after: {self.log[-12:]}"
            assert local[local_id]["text"] in truth.texts, (local[local_id], truth)
            assert local[local_id]["sync_status"] != "pending_deletion", (
                f"job {local_id} is being deleted but nobody deleted it: {local[local_id]}"
            )
            here = _sha256_of(local[local_id]["audio_file"])
            assert here in truth.audio, f"job {local_id} holds audio {here}, not {truth.audio}"
        for local_id, job in local.items():
            if local_id in self.known:
                continue
            # Only a create killed midway can have left a job we were not told about.
            assert job["text"] in self.maybe_created, f"a job appeared from nowhere: {job}"
            self.maybe_created.discard(job["text"])
            self.known[local_id] = Truth({job["text"]}, audio={self.audio_of.get(job["text"])})
            if job["sync_status"] == "pending_deletion":
                self.known[local_id].delete = "maybe"
        return local

    def normal_sync(self) -> None:
        """A normal pass (no daemon runs now), retried until it exits 0."""
        for _ in range(5):
            proc = self.cli("--server", self.server.url, "sync", "--json")
            assert "Traceback" not in proc.stderr, proc.stderr
            if proc.returncode == 0:
                return
            last = proc
        raise AssertionError(
            f"jobsyncd sync never exited 0 after: {self.log[-12:]}\n"
            f"{last.returncode}: {last.stdout}{last.stderr}"
        )

    def check_after_sync(self) -> None:
        self.normal_sync()
        local = self.check_store()
        remote = self.server.jobs()
        counts = collections.Counter(j["local_id"] for j in remote)
        dup = {lid: c for lid, c in counts.items() if c > 1}
        assert not dup, f"local_ids on the server more than once: {dup}"
        remote_by_lid = {j["local_id"]: j for j in remote}
        not_synced = [j for j in local.values() if j["sync_status"] != "synced"]
        assert not not_synced, f"jobs not synced after an ok pass: {not_synced}"
        only_local = sorted(set(local) - set(remote_by_lid))
        only_remote = sorted(set(remote_by_lid) - set(local))
        assert not only_local and not only_remote, (
            f"after an ok pass the store and the server disagree: only here {only_local}, "
            f"only on the server {only_remote}; after {self.log[-12:]}"
        )
        for local_id in list(self.known):
            truth = self.known[local_id]
            if truth.delete == "acked":
                assert local_id not in remote_by_lid, (
                    f"job {local_id} was deleted (exit 0) but is still on the server"
                )
                assert local_id not in local
                del self.known[local_id]
            elif local_id not in local:
                assert truth.delete == "maybe", f"job {local_id} was lost: {truth}"
                del self.known[local_id]
            else:
                text = remote_by_lid[local_id]["text"]
                assert text in truth.texts, (
                    f"job {local_id} holds {text!r} on the server, expected one of {truth.texts}"
                )
                assert local[local_id]["server_id"] == remote_by_lid[local_id]["id"]
                theirs = (remote_by_lid[local_id]["audio"] or {}).get("sha256")
                here = _sha256_of(local[local_id]["audio_file"])
                assert theirs == here and here in truth.audio, (
                    f"job {local_id}: audio {theirs} on the server, {here} here, "
                    f"expected one of {truth.audio}; after {self.log[-12:]}"
                )
                # A delete killed before it wrote left it live.
                self.known[local_id] = Truth({text}, audio={here})
        self.maybe_created.clear()  # every killed create has shown up by now or never will
        self.audio_of.clear()
        self.check_server_audio(remote)
        self.full_checks += 1
        self.kills_since_check = 0

    def server_audio_dir(self) -> Path:
        return self.server.workdir / "server-audio"

    def check_server_audio(self, remote: list[dict]) -> None:
        """One audio file on the server per job with audio: none left by a killed upload, a
        replaced audio or a deleted job (a request cut a moment ago may still be ending)."""
        want = sum(1 for j in remote if j["audio"])

        def files() -> int:
            return sum(1 for p in self.server_audio_dir().iterdir() if p.is_file())

        poll(lambda: files() == want, 10, f"{want} audio files on the server, not {files()}")

    def check_no_upload_left_after_expiry(self) -> tuple[int, int]:
        """The server's expiry sweep as it would run 25 h from now (24 h expiry), on the running
        server's audio dir: every upload a killed agent left behind goes, none is left. Returns
        (uploads there before the sweep, uploads it removed)."""
        root = self.server_audio_dir() / SUBDIR
        if not root.exists():
            return 0, 0
        before = sum(1 for p in root.iterdir() if p.name.endswith(".json"))
        later = UploadStore(self.server_audio_dir(), 1 << 30, clock=lambda: time.time() + 25 * 3600)
        removed = later.expire()
        left = sorted(p.name for p in root.iterdir() if p.name != ".lock")
        assert not left, f"uploads left after expiry: {left}"
        return before, removed

    def check_daemon_logs(self) -> None:
        for path in self.daemon_logs:
            text = path.read_text()
            assert "Traceback" not in text, f"{path}:\n{text}"


@pytest.mark.timeout(90 + 4 * KILLS)
def test_random_sigkills_never_lose_or_duplicate_a_job(cli, ref_server, tmp_path, capsys):
    run_harness(Harness(cli, ref_server, random.Random(SEED), tmp_path), KILLS, capsys, "")


LOSSY_KILLS = int(os.environ.get("JOBSYNCD_CRASH_LOSSY_KILLS", str(max(KILLS // 2, 1))))


@pytest.mark.timeout(120 + 5 * LOSSY_KILLS)
def test_random_sigkills_through_a_proxy_that_loses_and_trickles_answers_lose_nothing(
    cli, ref_server, tmp_path, capsys
):
    # Answers lost or trickled make retries and errors; allow the errored jobs to go again at once.
    cli.env["JOBSYNCD_MAX_RETRIES"] = "1000"
    with LossyProxy(ref_server.port, SEED + 2) as proxy:
        h = Harness(cli, ref_server, random.Random(SEED + 3), tmp_path, op_url=proxy.url)
        run_harness(h, LOSSY_KILLS, capsys, " via the lossy proxy")
        assert proxy.counts["lose"] and proxy.counts["trickle"], proxy.counts
        with capsys.disabled():
            print(f"lossy proxy connections: {proxy.counts}")


def _sha256_of(path: str | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()  # at most 2 MiB


def run_harness(h: Harness, kills: int, capsys, label: str) -> None:
    h.cli.env["JOBSYNCD_UPLOAD_CHUNK_BYTES"] = str(UPLOAD_CHUNK)
    start = time.monotonic()
    try:
        for _ in range(20 * kills):  # bounded: most rounds deliver a kill
            if h.kills >= kills:
                break
            before = h.kills
            h.round()
            if h.kills > before:
                h.check_store()
                if h.kills_since_check >= FULL_CHECK_EVERY_KILLS:
                    h.check_after_sync()
        h.check_after_sync()
        h.check_daemon_logs()
        uploads_before, uploads_expired = h.check_no_upload_left_after_expiry()
    except AssertionError as exc:
        raise AssertionError(
            f"seed {SEED}, after {h.kills} kills{label} (replay: JOBSYNCD_CRASH_SEED={SEED} "
            f"JOBSYNCD_CRASH_KILLS={KILLS}): {exc}"
        ) from None
    assert h.kills >= kills, f"only {h.kills} kills were delivered"
    if not h.lossy and kills >= 30:  # through the lossy proxy uploads go slower: not asked
        assert h.mid_upload, "no kill landed in the middle of an upload"
    line = (
        f"crash harness: {h.kills} kills survived, jobs lost: 0, duplicates: 0, audio wrong: 0, "
        f"uploads left after expiry: 0 (seed {SEED}, {h.full_checks} full checks, "
        f"{len(h.known)} jobs at the end, {h.audio_jobs} creates/updates with audio, "
        f"{h.mid_upload} kills left an upload in progress, "
        f"{uploads_before} uploads on the server before its sweep, {uploads_expired} expired, "
        f"{time.monotonic() - start:.1f} s; killed: "
        + ", ".join(f"{k} {v}" for k, v in sorted(h.by_kind.items()))
        + ")"
        + label
    )
    (h.workdir / "crash-summary.txt").write_text(line + "\n")
    with capsys.disabled():
        print("\n" + line)


# ---- compaction killed at random instants ----------------------------------------------------

COMPACT_JOBS = 20_000
COMPACT_KILLS = int(os.environ.get("JOBSYNCD_COMPACT_KILLS", "8"))


def kill_at_random(cli, command: str, delay: float) -> tuple[bool, str]:
    """Run `jobsyncd command`, SIGKILL it if it still runs after `delay` seconds; returns
    whether it was killed, and its stderr."""
    proc = cli.popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    try:
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            killed = True
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return killed, err


def kill_in_rounds(
    cli,
    rng: random.Random,
    command: str,
    duration: float,
    wanted: int,
    before: Callable[[int], None],
    after: Callable[[int, str], None],
) -> int:
    """Rounds of `before(round)`, `jobsyncd command` SIGKILLed at a random instant of about
    its `duration`, `after(round, stderr)`, until `wanted` kills (at most 4 x `wanted`
    rounds); at least half of them must catch the command running. Returns the kills."""
    kills = 0
    for round_no in range(4 * wanted):
        if kills >= wanted:
            break
        before(round_no)
        killed, err = kill_at_random(cli, command, rng.uniform(0.0, duration * 1.1))
        kills += killed
        after(round_no, err)
    assert kills >= wanted // 2, f"only {kills} runs of `{command}` were caught running"
    return kills


def prepared(data_dir: str) -> None:
    """The data dir made as jobsyncd makes it (0700, under umask 077), for a store written here."""
    old = os.umask(0o077)
    try:
        prepare_data_dir(data_dir)
    finally:
        os.umask(old)


def _store_lines(data_dir: Path) -> int:
    with open(data_dir / STORE_NAME, "rb") as fh:
        return sum(1 for _ in fh)


@pytest.mark.timeout(120 + 10 * COMPACT_KILLS)
def test_compact_killed_at_random_instants_leaves_every_job_loadable(cli, tmp_path, capsys):
    rng = random.Random(SEED + 1)
    data_dir = str(cli.data_dir)
    prepared(data_dir)
    store = Store(data_dir)
    expected: dict[str, str] = {}
    jobs = []
    for i in range(COMPACT_JOBS):
        job = Job(local_id=new_local_id(), text=f"job {i}", metadata={"i": i})
        jobs.append(job)
        expected[job.local_id] = job.text
    store.append(jobs)
    doomed = [new_local_id() for _ in range(500)]
    store.append([Job(local_id=lid, text="doomed") for lid in doomed])
    store.append(purge=doomed)
    ids = sorted(expected)

    def add_dead_records(round_no: int) -> None:
        """Supersede some records so that every compaction has real work to do."""
        batch = []
        for lid in rng.sample(ids, 2000):
            text = f"edit {round_no} of {lid[:8]}"
            batch.append(Job(local_id=lid, text=text, metadata={"round": round_no}))
            expected[lid] = text
        Store(data_dir).append(batch)

    def check_loadable() -> None:
        proc = cli("list", "--json")
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        got = {}
        for line in proc.stdout.splitlines():
            job = json.loads(line)
            got[job["local_id"]] = job["text"]
        assert len(got) == len(expected), f"{len(got)} jobs load, {len(expected)} expected"
        assert got == expected, "a job lost or reverted by a killed compaction"

    t0 = time.monotonic()
    done = cli("compact", timeout=60)
    duration = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert _store_lines(cli.data_dir) == COMPACT_JOBS
    check_loadable()

    def after_kill(round_no: int, err: str) -> None:
        check_loadable()
        # An ordinary create still works and repairs anything a kill left behind.
        created = cli("create", "--text", f"after kill {round_no}")
        assert created.returncode == 0, created.stderr
        expected[created.stdout.strip()] = f"after kill {round_no}"
        ids.append(created.stdout.strip())

    kills = kill_in_rounds(cli, rng, "compact", duration, COMPACT_KILLS, add_dead_records, after_kill)

    final = cli("compact", timeout=60)
    assert final.returncode == 0, final.stderr
    assert not (cli.data_dir / TMP_NAME).exists(), "a crashed compaction's temporary file stays"
    assert _store_lines(cli.data_dir) == len(expected)
    check_loadable()
    with capsys.disabled():
        print(
            f"\ncompact harness: {kills} kills of `jobsyncd compact` on {COMPACT_JOBS} jobs survived"
        )


# ---- passes over a lazily folded store killed at random instants ------------------------------

LAZY_JOBS = 400
LAZY_KILLS = int(os.environ.get("JOBSYNCD_LAZY_KILLS", "10"))


@pytest.mark.timeout(120 + 10 * LAZY_KILLS)
def test_passes_over_a_lazily_folded_store_killed_at_random_instants_lose_nothing(
    cli, ref_server, capsys
):
    """A pass that must fold the store (150 edits due) holds the lines its last pass checked
    unparsed (jobs.checked.json) and moves the record on as it writes: SIGKILLed anywhere in
    it, the next passes still push every edit, once, and lose no job."""
    from jobsyncd.jobs import update_job

    rng = random.Random(SEED + 4)
    cli.env["JOBSYNCD_SERVER_URL"] = ref_server.url
    data_dir = str(cli.data_dir)
    prepared(data_dir)
    jobs = [Job(local_id=new_local_id(), text=f"job {i}") for i in range(LAZY_JOBS)]
    Store(data_dir).append(jobs)
    expected = {j.local_id: j.text for j in jobs}
    assert cli("sync").returncode == 0
    checked = cli.data_dir / "jobs.checked.json"
    assert checked.exists(), "the first pass compacted: its lines are checked"

    def edit(round_no: int) -> None:
        store = Store(data_dir)
        for lid in rng.sample(sorted(expected), 150):
            text = f"edit {round_no} of {lid[:8]}"
            update_job(store, lid, text, None, {}, [])
            expected[lid] = text

    edit(-1)
    t0 = time.monotonic()
    assert cli("sync").returncode == 0
    duration = time.monotonic() - t0
    def no_traceback(round_no: int, err: str) -> None:
        assert "Traceback" not in err, err

    kills = kill_in_rounds(cli, rng, "sync", duration, LAZY_KILLS, edit, no_traceback)

    for _ in range(5):  # a kill may leave jobs in back-off: retried at once here
        done = cli("sync", "--json")
        if done.returncode == 0 and json.loads(done.stdout)["errors"] == 0:
            break
    else:
        raise AssertionError(f"no clean pass after the kills: {done.stdout} {done.stderr}")
    on_server = ref_server.jobs()
    counts = collections.Counter(j["local_id"] for j in on_server)
    assert not {lid: c for lid, c in counts.items() if c > 1}, "a job duplicated on the server"
    assert {j["local_id"]: j["text"] for j in on_server} == expected
    here = {j["local_id"]: j for j in cli.jobs()}
    assert {lid: j["text"] for lid, j in here.items()} == expected
    assert all(j["sync_status"] == "synced" for j in here.values())
    record = json.loads(checked.read_text())
    assert record["end"] == (cli.data_dir / STORE_NAME).stat().st_size  # moved on by the passes
    with capsys.disabled():
        print(f"\nlazy-fold harness: {kills} kills of passes over {LAZY_JOBS} jobs survived")
