"""Storage faults (contract sections 2 and 4): a full disk, I/O errors, a read-only data dir,
planted directories and symlinks, stale lock files and a data dir of another user.

Each fault gives one clean `jobsyncd: error:` line and exit 1 and loses nothing already stored.
The file system faults use real mounts (a small tmpfs, remounted read-only); those tests skip
when mounting is not allowed here, and every mount is undone in the fixture's teardown.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import poll

import jobsyncd.store as store_mod
from jobsyncd.errors import JobsyncdError
from jobsyncd.model import Job, new_local_id
from jobsyncd.store import LOCK_NAME, STORE_NAME, TMP_NAME, Store, prepare_data_dir

# ---- helpers -----------------------------------------------------------------------------------


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, f"-> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("jobsyncd: warning:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("jobsyncd: error: "), proc.stderr
    assert "unexpected" not in errors[0], f"an unhandled exception reached the user: {errors[0]}"
    return errors[0]


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"-> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def listed(cli) -> dict[str, dict]:
    proc = ok(cli("list", "--json"))
    jobs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {j["local_id"]: j for j in jobs}


def use_data_dir(cli, path: Path) -> None:
    cli.data_dir = path
    cli.env["JOBSYNCD_DATA_DIR"] = str(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_lines_parse(data_dir: Path) -> list[dict]:
    raw = (data_dir / STORE_NAME).read_bytes()
    assert raw.endswith(b"\n"), "the store ends in a torn line"
    return [json.loads(line) for line in raw.splitlines()]


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path):
    """make(name, size) mounts a fresh tmpfs; every mount is undone at teardown."""
    mounts: list[Path] = []

    def make(name: str = "fs", size: str = "256k") -> Path:
        path = tmp_path / name
        path.mkdir()
        proc = _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounts.append(path)
        return path

    yield make
    for path in reversed(mounts):
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(path: Path, leave: int = 0) -> int:
    """Write `path` until the file system is full, then give back `leave` bytes; its size."""
    chunk = b"\0" * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(1 << 20):
            try:
                if os.write(fd, chunk) < len(chunk):
                    break
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        for _ in range(4096):  # the last partial page
            try:
                if os.write(fd, b"\0") < 1:
                    break
            except OSError:
                break
    finally:
        os.close(fd)
    size = path.stat().st_size
    if leave:
        os.truncate(path, max(0, size - leave))
    return path.stat().st_size


# ---- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_fails_an_audio_copy_cleanly_and_keeps_the_users_file(cli, tmpfs, tmp_path):
    fs = tmpfs()
    use_data_dir(cli, fs / "data")
    before = [ok(cli("create", "--text", f"before {i}")).stdout.strip() for i in range(3)]
    big = tmp_path / "big.wav"
    big.write_bytes(os.urandom(1 << 20))  # larger than the whole file system
    digest = sha256(big)

    line = one_error_line(cli("create", "--text", "big", "--audio", str(big)), code=1)

    assert "No space left on device" in line, line
    assert sha256(big) == digest, "the user's audio file changed"
    audio = fs / "data" / "audio"
    leftovers = sorted(p.name for p in audio.iterdir()) if audio.exists() else []
    assert leftovers == [], f"a failed copy left files behind: {leftovers}"
    assert sorted(listed(cli)) == sorted(before)


def test_a_full_disk_fails_a_create_with_one_line_and_loses_no_stored_job(cli, tmpfs):
    fs = tmpfs()
    data = fs / "data"
    use_data_dir(cli, data)
    acked = [ok(cli("create", "--text", f"before {i}")).stdout.strip() for i in range(3)]
    filler = fs / "filler"  # next to the data dir, never inside it
    fill(filler, leave=3 * 4096)

    failed = None
    for i in range(60):
        text = f"filling {i} " + "x" * 1500
        proc = cli("create", "--text", text)
        if proc.returncode == 0:
            acked.append(proc.stdout.strip())
            continue
        failed = (text, proc)
        break
    assert failed is not None, "the disk never filled up"
    text, proc = failed
    line = one_error_line(proc, code=1)
    assert "No space left on device" in line and str(data / STORE_NAME) in line, line

    # Everything acknowledged before is still there; the failed create is not.
    jobs = listed(cli)
    assert set(acked) <= set(jobs), f"jobs lost: {set(acked) - set(jobs)}"
    assert text not in {j["text"] for j in jobs.values()}
    assert len(jobs) == len(acked)
    # Still full: a second try fails the same clean way.
    one_error_line(cli("create", "--text", "still full " + "y" * 3000), code=1)
    assert set(listed(cli)) == set(acked)

    filler.unlink()
    after = ok(cli("create", "--text", "after freeing space")).stdout.strip()
    acked.append(after)
    proc = ok(cli("list", "--json"))
    assert proc.stderr == "", f"the store still has a torn line after a write: {proc.stderr}"
    assert {json.loads(ln)["local_id"] for ln in proc.stdout.splitlines()} == set(acked)
    records = store_lines_parse(data)
    assert {r["local_id"] for r in records} == set(acked)


def test_a_full_disk_fails_a_sync_pass_cleanly_and_the_next_pass_loses_nothing(
    cli, tmpfs, ref_server
):
    fs = tmpfs()
    data = fs / "data"
    use_data_dir(cli, data)
    acked = [ok(cli("create", "--text", f"job {i}")).stdout.strip() for i in range(20)]
    filler = fs / "filler"
    fill(filler)

    proc = cli("--server", ref_server.url, "sync")
    one_error_line(proc, code=1)
    assert set(listed(cli)) == set(acked)
    leftovers = [p.name for p in data.iterdir() if p.name.endswith(".tmp")]

    filler.unlink()
    ok(cli("--server", ref_server.url, "sync"))
    jobs = listed(cli)
    assert set(jobs) == set(acked)
    assert all(j["sync_status"] == "synced" for j in jobs.values())
    on_server = [j["local_id"] for j in ref_server.jobs()]
    assert sorted(on_server) == sorted(acked), "a job is missing or doubled on the server"
    assert leftovers == [], f"a failed state write left temporary files behind: {leftovers}"


def test_a_full_disk_during_the_pull_gives_a_clean_outcome_and_leaves_no_temporary_files(
    cli, tmpfs, ref_server
):
    """A pass with nothing to push still records its listing's ETag (and the last pass) in
    small state files; a full disk there must not surface as an unhandled error or leave
    half-written temporary files behind."""
    fs = tmpfs()
    data = fs / "data"
    use_data_dir(cli, data)
    ok(cli("list"))  # creates the data dir
    filler = fs / "filler"
    fill(filler)

    proc = cli("--server", ref_server.url, "sync", "--json")
    assert "Traceback" not in proc.stderr
    if proc.returncode != 0:
        one_error_line(proc, code=1)
    else:
        assert json.loads(proc.stdout)["ok"] is True
    leftovers = sorted(p.name for p in data.iterdir() if p.name.endswith(".tmp"))
    assert leftovers == [], f"temporary files left in the data dir: {leftovers}"
    filler.unlink()
    ok(cli("--server", ref_server.url, "sync"))


# ---- I/O errors (injected) ---------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path) -> Path:
    old = os.umask(0o077)
    try:
        prepare_data_dir(str(tmp_path / "unit"))
    finally:
        os.umask(old)
    return tmp_path / "unit"


def _eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def _jobs(n: int, prefix: str) -> list[Job]:
    return [Job(local_id=new_local_id(), text=f"{prefix} {i}") for i in range(n)]


def test_an_io_error_on_append_raises_a_clear_error_and_earlier_jobs_still_load(
    data_dir, monkeypatch
):
    earlier = _jobs(5, "earlier")
    Store(str(data_dir)).append(earlier)

    def failing_write(fd: int, blob: bytes) -> None:
        raise _eio()

    monkeypatch.setattr(store_mod, "_write_all", failing_write)
    with pytest.raises(JobsyncdError) as info:
        Store(str(data_dir)).append(_jobs(1, "doomed"))
    assert "Input/output error" in str(info.value)
    assert str(data_dir / STORE_NAME) in str(info.value)
    monkeypatch.undo()

    warnings: list[str] = []
    loaded = Store(str(data_dir), warn=warnings.append).load()
    assert set(loaded) == {j.local_id for j in earlier}
    assert warnings == []


@pytest.mark.parametrize("loaded", [False, True], ids=["fresh store", "loaded store"])
def test_a_write_torn_by_an_io_error_is_skipped_and_repaired_at_the_next_append(
    data_dir, monkeypatch, loaded
):
    earlier = _jobs(5, "earlier")
    writer = Store(str(data_dir), warn=lambda m: None)
    writer.append(earlier)
    if loaded:
        writer.load()

    def part_then_eio(fd: int, blob: bytes) -> None:
        os.write(fd, blob[: len(blob) // 3])  # part of the first line
        raise _eio()

    monkeypatch.setattr(store_mod, "_write_all", part_then_eio)
    with pytest.raises(JobsyncdError, match="Input/output error"):
        writer.append(_jobs(2, "torn"))
    monkeypatch.undo()
    assert not (data_dir / STORE_NAME).read_bytes().endswith(b"\n"), "the write was not torn"

    warnings: list[str] = []
    assert set(Store(str(data_dir), warn=warnings.append).load()) == {j.local_id for j in earlier}
    assert len(warnings) == 1 and "incomplete" in warnings[0], warnings

    later = _jobs(1, "later")
    (writer if loaded else Store(str(data_dir), warn=lambda m: None)).append(later)
    records = store_lines_parse(data_dir)
    assert {r["local_id"] for r in records} == {j.local_id for j in earlier + later}
    warnings.clear()
    assert set(Store(str(data_dir), warn=warnings.append).load()) == {
        j.local_id for j in earlier + later
    }
    assert warnings == []


def test_an_io_error_during_compaction_keeps_the_old_store_whole(data_dir, monkeypatch):
    jobs = _jobs(50, "kept")
    store = Store(str(data_dir))
    store.append(jobs)
    store.append(jobs[:10])  # dead records for the compaction to drop
    before = (data_dir / STORE_NAME).read_bytes()

    def half_then_eio(fd: int, blob: bytes) -> None:
        os.write(fd, blob[: len(blob) // 2])
        raise _eio()

    monkeypatch.setattr(store_mod, "_write_all", half_then_eio)
    with pytest.raises(JobsyncdError, match="Input/output error"):
        Store(str(data_dir)).compact()
    monkeypatch.undo()

    assert (data_dir / STORE_NAME).read_bytes() == before
    assert not (data_dir / TMP_NAME).exists()
    assert set(Store(str(data_dir)).load()) == {j.local_id for j in jobs}


def test_an_io_error_on_fsync_raises_a_clear_error(data_dir, monkeypatch):
    Store(str(data_dir)).append(_jobs(2, "earlier"))

    def failing_fsync(fd: int) -> None:
        raise _eio()

    monkeypatch.setattr(store_mod.os, "fsync", failing_fsync)
    try:
        with pytest.raises(JobsyncdError, match="Input/output error"):
            Store(str(data_dir)).append(_jobs(1, "unsure"))
    finally:
        monkeypatch.undo()
    assert len(Store(str(data_dir)).load()) >= 2


# ---- a read-only data dir ----------------------------------------------------------------------


@pytest.fixture
def read_only_data_dir(cli, tmpfs):
    fs = tmpfs("ro")
    use_data_dir(cli, fs / "data")
    ids = [ok(cli("create", "--text", f"stored {i}")).stdout.strip() for i in range(2)]
    proc = _mount("-o", "remount,ro", str(fs))
    if proc.returncode != 0:
        pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
    try:
        yield ids
    finally:
        _mount("-o", "remount,rw", str(fs))


def test_create_in_a_read_only_data_dir_fails_with_one_line(cli, read_only_data_dir):
    line = one_error_line(cli("create", "--text", "nowhere"), code=1)
    assert str(cli.data_dir) in line, line


def test_list_and_show_still_work_in_a_read_only_data_dir(cli, read_only_data_dir):
    assert set(listed(cli)) == set(read_only_data_dir)
    shown = json.loads(ok(cli("show", read_only_data_dir[0], "--json")).stdout)
    assert shown["text"] == "stored 0"


# ---- planted directories and symlinks ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("create", "--text", "x"), ("list",), ("update", "abcdef12", "--text", "y"), ("compact",)],
    ids=["create", "list", "update", "compact"],
)
def test_a_store_replaced_by_a_directory_is_refused_with_one_line(cli, args):
    ok(cli("create", "--text", "first"))
    store = cli.data_dir / STORE_NAME
    store.unlink()
    store.mkdir()
    line = one_error_line(cli(*args), code=1)
    assert str(store) in line, line
    assert store.is_dir() and list(store.iterdir()) == []


@pytest.mark.parametrize("dangling", [False, True], ids=["to a file", "dangling"])
@pytest.mark.parametrize(
    "args",
    [
        ("create", "--text", "x"),
        ("list", "--json"),
        ("update", "abcdef12", "--text", "y"),
        ("delete", "abcdef12"),
        ("compact",),
        ("sync",),
    ],
    ids=["create", "list", "update", "delete", "compact", "sync"],
)
def test_a_store_replaced_by_a_symlink_is_refused_and_its_target_untouched(
    cli, tmp_path, args, dangling
):
    ok(cli("create", "--text", "first"))
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    if not dangling:
        target.write_text("precious, not a store\n")
    store = cli.data_dir / STORE_NAME
    store.unlink()
    store.symlink_to(target)
    env_server = ("--server", "http://127.0.0.1:9") if args[0] == "sync" else ()

    line = one_error_line(cli(*env_server, *args), code=1)

    assert str(store) in line, line
    if dangling:
        assert not target.exists(), "a file was created through the symlink"
    else:
        assert target.read_text() == "precious, not a store\n"
    assert store.is_symlink()


@pytest.mark.parametrize(
    "name,args",
    [
        (LOCK_NAME, ("create", "--text", "x")),
        (TMP_NAME, ("compact",)),
        ("audio", ("create", "--audio", "{audio}")),
        ("sync.lock", ("sync",)),
    ],
    ids=["store lock", "compaction file", "audio folder", "sync lock"],
)
def test_a_symlink_planted_in_the_data_dir_is_refused_and_its_target_untouched(
    cli, tmp_path, ref_server, name, args
):
    ok(cli("create", "--text", "first"))
    src = tmp_path / "user.wav"
    src.write_bytes(b"RIFF fake audio")
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / ("dir" if name == "audio" else "file")
    if name == "audio":
        target.mkdir()
        (target / "keep").write_text("keep")
    else:
        target.write_text("keep\n")
    link = cli.data_dir / name
    if link.exists() and not link.is_dir():
        link.unlink()
    link.symlink_to(target)
    args = tuple(a.replace("{audio}", str(src)) for a in args)

    line = one_error_line(cli("--server", ref_server.url, *args), code=1)

    assert str(link) in line, line
    if name == "audio":
        assert sorted(p.name for p in target.iterdir()) == ["keep"]
    else:
        assert target.read_text() == "keep\n"
    if name != LOCK_NAME:  # with the lock refused, nothing reads the store
        assert len(listed(cli)) == 1


# ---- stale lock files --------------------------------------------------------------------------


_wait_for = poll  # the shared deadline-bounded poll (tests/support/helpers.py)


def _status(cli) -> dict:
    return json.loads(ok(cli("status", "--json")).stdout)


def test_locks_left_by_sigkilled_holders_do_not_block_later_commands_or_a_new_daemon(
    cli, ref_server
):
    first = ok(cli("create", "--text", "before")).stdout.strip()
    procs: list[subprocess.Popen] = []
    try:
        # A process that holds the store lock, SIGKILLed while holding it.
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n",
                str(cli.data_dir / LOCK_NAME),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(holder)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        # A daemon that holds daemon.lock (and left daemon.pid, daemon.sock), SIGKILLed.
        daemon = cli.popen(
            "--server",
            ref_server.url,
            "daemon",
            "--interval",
            "60",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(daemon)
        _wait_for((cli.data_dir / "daemon.pid").exists, what="the daemon started")
        holder.send_signal(signal.SIGKILL)
        daemon.send_signal(signal.SIGKILL)
        holder.wait(10)
        daemon.wait(10)
        assert (cli.data_dir / LOCK_NAME).exists() and (cli.data_dir / "daemon.lock").exists()

        t0 = time.monotonic()
        second = ok(cli("create", "--text", "after")).stdout.strip()
        assert time.monotonic() - t0 < 5, "a create waited for a dead process's lock"
        assert _status(cli)["daemon"] == {"running": False, "pid": None}

        fresh = cli.popen(
            "--server",
            ref_server.url,
            "daemon",
            "--interval",
            "60",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(fresh)
        _wait_for(lambda: _status(cli)["daemon"]["pid"] == fresh.pid, what="the new daemon runs")
        _wait_for(
            lambda: {j["local_id"] for j in ref_server.jobs()} == {first, second},
            what="the new daemon synced both jobs",
        )
        # A sync now goes to the new daemon; a second daemon is refused with 75.
        handed = ok(cli("--server", ref_server.url, "sync", "--json"))
        assert json.loads(handed.stdout)["handed_to_daemon"] == fresh.pid
        rival = cli("--server", ref_server.url, "daemon", "--interval", "60", timeout=30)
        assert rival.returncode == 75, rival.stderr
        assert str(fresh.pid) in rival.stderr

        fresh.send_signal(signal.SIGTERM)
        _, err = fresh.communicate(timeout=10)
        assert fresh.returncode == 0, err
        assert "Traceback" not in err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


# ---- a data dir of another user ----------------------------------------------------------------


@pytest.mark.parametrize("args", [("create", "--text", "x"), ("list",)], ids=["create", "list"])
def test_a_data_dir_owned_by_another_user_is_refused_with_one_line(cli, args):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the data dir")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    ok(cli("create", "--text", "mine"))
    os.chown(cli.data_dir, nobody.pw_uid, nobody.pw_gid)
    before = (cli.data_dir / STORE_NAME).read_bytes()
    try:
        line = one_error_line(cli(*args), code=1)
    finally:
        os.chown(cli.data_dir, 0, 0)
    assert str(cli.data_dir) in line and "another user" in line, line
    assert (cli.data_dir / STORE_NAME).read_bytes() == before
