"""The installed `jobsyncd` command line (contract section 2), run as a real process."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobsyncd.model import Job, is_uuid, new_local_id
from jobsyncd.store import STORE_NAME, Store, prepare_data_dir

JOB_KEYS = {
    "local_id", "server_id", "text", "audio_file", "metadata", "server_status", "sync_status",
    "retry_count", "last_sync_attempt_at", "last_error", "created_at", "updated_at",
}
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def run(cli, *args: str, code: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run jobsyncd, check the exit code and that no traceback reached the user."""
    if env is None:
        proc = cli(*args)
    else:
        proc = subprocess.run([cli.binary, *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, f"jobsyncd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert "Traceback" not in proc.stdout
    return proc


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jobsyncd: error: "), proc.stderr
    return lines[0]


def create(cli, *args: str) -> dict:
    return json.loads(run(cli, "create", *args, "--json").stdout)


def show(cli, ref: str) -> dict:
    return json.loads(run(cli, "show", ref, "--json").stdout)


def seed(cli, *jobs: Job) -> None:
    """Write jobs straight into the CLI's store (for states the CLI cannot make by itself)."""
    old = os.umask(0o077)
    try:
        prepare_data_dir(str(cli.data_dir))
        Store(str(cli.data_dir)).append(list(jobs))
    finally:
        os.umask(old)


def seeded_job(local_id: str | None = None, **kw) -> Job:
    kw.setdefault("created_at", "2026-01-01T00:00:00.000Z")
    kw.setdefault("updated_at", kw["created_at"])
    return Job(local_id=local_id or new_local_id(), **kw)


def with_prefix(prefix: str) -> str:
    return prefix + new_local_id()[len(prefix):]


def write_config(cli, text: str) -> Path:
    path = cli.data_dir.parent / "config.toml"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


# ---- create ----------------------------------------------------------------------------------


def test_create_prints_the_new_local_id_alone(cli):
    proc = run(cli, "create", "--text", "hello")
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1
    local_id = proc.stdout.strip()
    assert is_uuid(local_id)
    assert proc.stderr == ""
    job = show(cli, local_id)
    assert job["text"] == "hello" and job["sync_status"] == "pending"


def test_create_json_has_exactly_the_job_keys_and_their_initial_values(cli):
    job = create(cli)
    assert set(job) == JOB_KEYS
    assert is_uuid(job["local_id"])
    assert job["server_id"] is None
    assert job["text"] == ""
    assert job["audio_file"] is None
    assert job["metadata"] == {}
    assert job["server_status"] is None
    assert job["sync_status"] == "pending"
    assert job["retry_count"] == 0
    assert job["last_sync_attempt_at"] is None
    assert job["last_error"] is None
    assert RFC3339_Z.match(job["created_at"]) and job["created_at"] == job["updated_at"]


def test_create_parses_meta_values_as_json_when_they_parse(cli):
    job = create(
        cli, "--meta", "n=3", "--meta", "s=hello", "--meta", "k=", "--meta", "url=a=b",
        "--meta", 'obj={"a": [1, true]}', "--meta", "f=1.5", "--meta", "b=false", "--meta", "nil=null",
        "--meta", 'q="7"',
    )
    assert job["metadata"] == {
        "n": 3, "s": "hello", "k": "", "url": "a=b", "obj": {"a": [1, True]}, "f": 1.5,
        "b": False, "nil": None, "q": "7",
    }


def test_create_with_a_meta_missing_its_equals_sign_is_a_usage_error(cli):
    proc = run(cli, "create", "--meta", "novalue", code=2)
    one_error_line(proc)
    assert proc.stdout == ""
    assert run(cli, "list", "--json").stdout == ""


def test_create_with_audio_copies_the_file_into_the_data_dir(cli, tmp_path):
    src = tmp_path / "dictation.wav"
    src.write_bytes(b"RIFF" + bytes(range(256)) * 100)
    os.chmod(src, 0o644)
    before = src.stat()
    job = create(cli, "--audio", str(src), "--text", "t")
    copy = Path(job["audio_file"])
    assert copy.is_absolute()
    assert copy.parent == cli.data_dir / "audio"
    assert copy.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    after = src.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size, stat.S_IMODE(after.st_mode)) == (
        before.st_ino, before.st_mtime_ns, before.st_size, 0o644,
    )


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_create_with_a_missing_or_unusable_audio_file_is_a_usage_error(cli, tmp_path, kind):
    path = tmp_path / "nope.wav"
    if kind == "directory":
        path.mkdir()
    proc = run(cli, "create", "--audio", str(path), code=2)
    assert "nope.wav" in one_error_line(proc)
    assert proc.stdout == ""
    assert run(cli, "list", "--json").stdout == ""


def test_create_makes_the_data_dir_private(cli):
    run(cli, "create")
    assert stat.S_IMODE(cli.data_dir.stat().st_mode) == 0o700
    for name in (STORE_NAME, "jobs.lock"):
        assert stat.S_IMODE((cli.data_dir / name).stat().st_mode) == 0o600


def python_c(cli, code: str) -> subprocess.CompletedProcess[str]:
    """`python -c code` with the agent's environment; it must exit 0."""
    proc = subprocess.run([sys.executable, "-c", code], env=cli.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_create_does_not_import_requests(cli):
    code = (
        "import sys\n"
        "from jobsyncd.cli import main\n"
        "try:\n"
        "    main(['create', '--text', 'x'])\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code or 0\n"
        "heavy = sorted(m for m in ('requests', 'urllib3') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = python_c(cli, code)
    assert is_uuid(proc.stdout.strip())
    assert proc.stderr.splitlines()[-1] == "HEAVY=", proc.stderr


def test_the_installed_command_leaves_its_objects_to_the_exit(cli):
    """`jobsyncd` (the console script) freezes the cyclic collector's objects as it ends, so
    the interpreter's shutdown does not walk them all once more; its output is still whole."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "jobsyncd"]
    assert script.value == "jobsyncd.cli:entry"
    for i in range(3):
        create(cli, "--text", f"job {i}")
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('FROZEN', gc.get_freeze_count() > 0, file=sys.stderr))\n"
        "sys.argv = ['jobsyncd', 'list', '--json']\n"
        "from jobsyncd.cli import entry\n"
        "entry()\n"
    )
    proc = python_c(cli, code)
    assert [json.loads(line)["text"] for line in proc.stdout.splitlines()] == [f"job {i}" for i in range(3)]
    assert proc.stderr.splitlines()[-1] == "FROZEN True", proc.stderr


# ---- update ----------------------------------------------------------------------------------


def test_update_changes_the_text_and_merges_and_unsets_metadata(cli):
    job = create(cli, "--text", "one", "--meta", "a=1", "--meta", "b=2")
    proc = run(cli, "update", job["local_id"], "--text", "two", "--meta", "b=20", "--meta", "c=x", "--json")
    updated = json.loads(proc.stdout)
    assert set(updated) == JOB_KEYS
    assert updated["text"] == "two"
    assert updated["metadata"] == {"a": 1, "b": 20, "c": "x"}
    assert updated["sync_status"] == "pending"
    assert updated["updated_at"] >= job["updated_at"]
    run(cli, "update", job["local_id"][:8], "--unset-meta", "a", "--unset-meta", "missing")
    final = show(cli, job["local_id"])
    assert final["metadata"] == {"b": 20, "c": "x"}
    assert final["text"] == "two"
    assert final["created_at"] == job["created_at"]


def test_update_without_json_prints_the_local_id(cli):
    job = create(cli)
    assert run(cli, "update", job["local_id"], "--text", "x").stdout.strip() == job["local_id"]


def test_update_with_new_audio_replaces_the_copy_and_removes_the_old_one(cli, tmp_path):
    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    first.write_bytes(b"first audio")
    second.write_bytes(b"second audio")
    job = create(cli, "--audio", str(first))
    old_copy = Path(job["audio_file"])
    updated = json.loads(run(cli, "update", job["local_id"], "--audio", str(second), "--json").stdout)
    new_copy = Path(updated["audio_file"])
    assert new_copy != old_copy
    assert new_copy.read_bytes() == b"second audio"
    assert not old_copy.exists()
    assert first.read_bytes() == b"first audio" and second.read_bytes() == b"second audio"
    assert sorted(p.name for p in (cli.data_dir / "audio").iterdir()) == [new_copy.name]


def test_update_with_a_missing_audio_file_is_a_usage_error_and_changes_nothing(cli, tmp_path):
    job = create(cli, "--text", "keep")
    proc = run(cli, "update", job["local_id"], "--text", "new", "--audio", str(tmp_path / "gone.wav"), code=2)
    one_error_line(proc)
    assert show(cli, job["local_id"]) == job


def test_update_without_any_option_is_a_usage_error(cli):
    job = create(cli)
    proc = run(cli, "update", job["local_id"], code=2)
    one_error_line(proc)
    assert show(cli, job["local_id"]) == job


def test_an_update_that_changes_nothing_leaves_the_job_untouched(cli, tmp_path):
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"same audio")
    synced = seeded_job(text="t", metadata={"a": 1}, sync_status="synced", server_id="s-1", server_status="done")
    seed(cli, synced)
    before = show(cli, synced.local_id)
    run(cli, "update", synced.local_id, "--text", "t", "--meta", "a=1", "--unset-meta", "zz")
    assert show(cli, synced.local_id) == before

    job = create(cli, "--text", "x", "--audio", str(audio))
    time.sleep(0.002)  # timestamps have millisecond precision: make a change visible
    run(cli, "update", job["local_id"], "--text", "x", "--audio", str(audio))
    assert show(cli, job["local_id"]) == job


def test_a_real_update_of_a_synced_job_makes_it_pending(cli):
    synced = seeded_job(text="t", sync_status="synced", server_id="s-1")
    seed(cli, synced)
    after = json.loads(run(cli, "update", "s-1", "--text", "changed", "--json").stdout)
    assert after["sync_status"] == "pending"
    assert after["server_id"] == "s-1"
    assert after["updated_at"] > synced.updated_at


def test_update_of_a_failed_job_makes_it_pending_with_retry_count_zero(cli):
    failed = seeded_job(text="t", sync_status="failed", retry_count=5, last_error="boom")
    seed(cli, failed)
    after = json.loads(run(cli, "update", failed.local_id, "--text", "fixed", "--json").stdout)
    assert (after["sync_status"], after["retry_count"]) == ("pending", 0)


def test_update_of_a_job_pending_deletion_fails(cli):
    job = create(cli, "--text", "t")
    run(cli, "delete", job["local_id"])
    proc = run(cli, "update", job["local_id"], "--text", "again", code=1)
    one_error_line(proc)
    assert proc.stdout == ""
    after = show(cli, job["local_id"])
    assert after["text"] == "t" and after["sync_status"] == "pending_deletion"


def test_update_of_a_failed_delete_fails(cli):
    failed = seeded_job(text="t", sync_status="failed", error_kind="delete", server_id="s-2", retry_count=5)
    seed(cli, failed)
    one_error_line(run(cli, "update", failed.local_id, "--text", "again", code=1))


# ---- delete, list, show ----------------------------------------------------------------------


def test_delete_marks_the_job_pending_deletion(cli):
    job = create(cli, "--text", "t")
    proc = run(cli, "delete", job["local_id"][:10])
    assert proc.stdout.strip() == job["local_id"]
    assert show(cli, job["local_id"])["sync_status"] == "pending_deletion"
    run(cli, "delete", job["local_id"])  # twice is fine
    assert [j["sync_status"] for j in cli.jobs()] == ["pending_deletion"]


def test_delete_of_an_unknown_job_fails(cli):
    create(cli)
    one_error_line(run(cli, "delete", new_local_id(), code=1))


def test_list_json_gives_json_lines_oldest_first(cli):
    ids = [run(cli, "create", "--text", f"t{i}").stdout.strip() for i in range(4)]
    proc = run(cli, "list", "--json")
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    jobs = [json.loads(line) for line in lines]
    assert [j["local_id"] for j in jobs] == ids
    assert all(set(j) == JOB_KEYS for j in jobs)


def test_list_limit_gives_the_n_oldest(cli):
    ids = [run(cli, "create", "--text", f"t{i}").stdout.strip() for i in range(4)]
    got = [json.loads(line)["local_id"] for line in run(cli, "list", "--limit", "2", "--json").stdout.splitlines()]
    assert got == ids[:2]
    assert run(cli, "list", "--limit", "0", "--json").stdout == ""
    one_error_line(run(cli, "list", "--limit", "-1", code=2))


def test_list_status_filters_and_repeats(cli):
    a = run(cli, "create", "--text", "a").stdout.strip()
    b = run(cli, "create", "--text", "b").stdout.strip()
    failed = seeded_job(text="f", sync_status="failed", created_at="2030-01-01T00:00:00.000Z")
    seed(cli, failed)
    run(cli, "delete", b)

    def listed(*args):
        return [json.loads(line)["local_id"] for line in run(cli, "list", *args, "--json").stdout.splitlines()]

    assert listed("--status", "pending") == [a]
    assert listed("--status", "pending_deletion") == [b]
    assert listed("--status", "pending", "--status", "failed") == [a, failed.local_id]
    assert listed("--status", "synced") == []
    assert listed("--status", "pending", "--status", "pending_deletion", "--limit", "1") == [a]
    one_error_line(run(cli, "list", "--status", "bogus", code=2))


def test_list_for_people_works_with_and_without_jobs(cli):
    run(cli, "list")
    run(cli, "create", "--text", "line one\nline two")
    assert run(cli, "list").stdout.strip()


def test_show_matches_a_local_id_prefix_case_insensitively_and_a_server_id(cli):
    a = seeded_job(with_prefix("abcdef01"), text="a", server_id="srv-77", sync_status="synced")
    seed(cli, a)
    assert show(cli, "abcdef")["text"] == "a"
    assert show(cli, "ABCDEF01")["text"] == "a"
    assert show(cli, a.local_id.upper())["text"] == "a"
    assert show(cli, "srv-77")["local_id"] == a.local_id
    assert a.local_id in run(cli, "show", "abcdef").stdout


@pytest.mark.parametrize("ref", ["abcde", "0123456789", "no-such-job"])
def test_show_of_an_unknown_or_too_short_reference_fails(cli, ref):
    seed(cli, seeded_job(with_prefix("abcdef01")))
    proc = run(cli, "show", ref, code=1)
    assert "no job matches" in one_error_line(proc)
    assert proc.stdout == ""


def test_show_of_an_ambiguous_prefix_fails_listing_the_ids(cli):
    a, b = seeded_job(with_prefix("abcdef01")), seeded_job(with_prefix("abcdef02"))
    seed(cli, a, b)
    line = one_error_line(run(cli, "show", "abcdef", code=1))
    assert a.local_id in line and b.local_id in line
    assert show(cli, "abcdef01")["local_id"] == a.local_id


def test_show_without_json_shows_the_fields(cli):
    job = create(cli, "--text", "visible text")
    out = run(cli, "show", job["local_id"]).stdout
    assert "visible text" in out and job["local_id"] in out


# ---- retry -----------------------------------------------------------------------------------


def test_retry_of_a_job_that_is_not_failed_fails(cli):
    job = create(cli)
    proc = run(cli, "retry", job["local_id"], code=1)
    assert "failed" in one_error_line(proc)
    assert show(cli, job["local_id"]) == job


def test_retry_puts_a_failed_job_back_with_retry_count_zero(cli):
    failed = seeded_job(text="t", sync_status="failed", retry_count=5, last_error="boom")
    failed_delete = seeded_job(text="d", sync_status="failed", retry_count=5, error_kind="delete", server_id="s-9")
    seed(cli, failed, failed_delete)
    assert run(cli, "retry", failed.local_id).stdout.strip() == failed.local_id
    after = show(cli, failed.local_id)
    assert (after["sync_status"], after["retry_count"]) == ("pending", 0)
    run(cli, "retry", "s-9")
    after = show(cli, "s-9")
    assert (after["sync_status"], after["retry_count"]) == ("pending_deletion", 0)


def test_retry_all_prints_the_number_of_jobs_put_back(cli):
    assert run(cli, "retry", "--all").stdout == "0\n"
    create(cli)
    seed(cli, seeded_job(sync_status="failed", retry_count=5), seeded_job(sync_status="failed", retry_count=1))
    assert run(cli, "retry", "--all").stdout == "2\n"
    assert run(cli, "retry", "--all").stdout == "0\n"
    assert {j["sync_status"] for j in cli.jobs()} == {"pending"}


def test_retry_without_a_job_or_all_is_a_usage_error(cli):
    one_error_line(run(cli, "retry", code=2))


# ---- status, compact, version ---------------------------------------------------------------


def test_status_json_has_the_contract_keys_with_no_server_configured(cli):
    report = json.loads(run(cli, "status", "--json").stdout)
    assert report == {
        "total": 0,
        "counts": {"pending": 0, "synced": 0, "pending_deletion": 0, "error": 0, "failed": 0},
        "oldest_pending_age_seconds": None,
        "daemon": {"running": False, "pid": None},
        "last_pass": None,
        "server_url": None,
        "data_dir": str(cli.data_dir),
        # keys contract v5 allows status --json to add:
        "feed": {"mode": "unknown", "checkpoint_age_seconds": None},
        "uploads_in_progress": [],
    }
    assert os.path.isabs(report["data_dir"])


def test_status_json_counts_jobs_and_ages_the_oldest_pending_change(cli):
    create(cli)
    seed(cli, seeded_job(sync_status="synced", server_id="x"), seeded_job(sync_status="failed"))
    report = json.loads(run(cli, "status", "--json").stdout)
    assert report["total"] == 3
    assert report["counts"] == {"pending": 1, "synced": 1, "pending_deletion": 0, "error": 0, "failed": 1}
    assert isinstance(report["oldest_pending_age_seconds"], (int, float))
    assert 0 <= report["oldest_pending_age_seconds"] < 60
    run(cli, "status")


def test_compact_keeps_every_job_and_shrinks_the_store(cli):
    ids = [run(cli, "create", "--text", f"t{i}").stdout.strip() for i in range(3)]
    for i in range(3):
        run(cli, "update", ids[0], "--text", f"v{i}")
    before = cli.jobs()
    size = (cli.data_dir / STORE_NAME).stat().st_size
    run(cli, "compact")
    assert cli.jobs() == before
    assert (cli.data_dir / STORE_NAME).stat().st_size < size
    assert len((cli.data_dir / STORE_NAME).read_text().splitlines()) == 3


def test_version_prints_the_program_name_and_version(cli):
    proc = run(cli, "--version")
    assert re.fullmatch(r"jobsyncd \d+\.\d+\.\d+\n", proc.stdout)


def test_help_works(cli):
    assert "create" in run(cli, "--help").stdout


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("--no-such-option",), ("create", "--bogus"), ("no-such-command",), ("show",), ("list", "--limit", "x")],
)
def test_a_bad_command_line_is_a_usage_error_in_one_line(cli, args):
    proc = run(cli, *args, code=2)
    one_error_line(proc)
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args", [("create",), ("list",), ("show", "abcdef"), ("status",), ("compact",), ("retry", "--all"), ("update", "abcdef", "--text", "x"), ("delete", "abcdef")]
)
@pytest.mark.parametrize(
    "text", ['server_url = "https://x\n', "interval_seconds = \"soon\"\n", "verify_tls = 3\n"]
)
def test_an_invalid_config_file_exits_78_for_every_command(cli, args, text):
    cfg = write_config(cli, text)
    proc = run(cli, "--config", str(cfg), *args, code=78)
    line = one_error_line(proc)
    assert str(cfg) in line or "interval_seconds" in line or "verify_tls" in line
    assert proc.stdout == ""


def test_a_missing_config_file_named_by_the_flag_or_env_exits_78(cli, tmp_path):
    missing = tmp_path / "missing.toml"
    assert "missing.toml" in one_error_line(run(cli, "--config", str(missing), "list", code=78))
    env = dict(cli.env, JOBSYNCD_CONFIG=str(missing))
    one_error_line(run(cli, "list", code=78, env=env))


def test_a_wrong_type_in_an_env_variable_exits_78(cli):
    env = dict(cli.env, JOBSYNCD_MAX_RETRIES="lots")
    assert "max_retries" in one_error_line(run(cli, "create", code=78, env=env))


def test_the_default_config_file_is_read(cli):
    cfg_dir = Path(cli.env["XDG_CONFIG_HOME"]) / "jobsyncd"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "config.toml").write_text('server_url = "https://jobs.example.org"\n')
    os.chmod(cfg_dir / "config.toml", 0o600)
    assert json.loads(run(cli, "status", "--json").stdout)["server_url"] == "https://jobs.example.org"


def test_a_group_readable_config_warns_on_stderr_and_stdout_stays_parseable(cli):
    cfg = write_config(cli, 'server_url = "https://jobs.example.org"\n')
    os.chmod(cfg, 0o644)
    proc = run(cli, "--config", str(cfg), "status", "--json")
    assert json.loads(proc.stdout)["server_url"] == "https://jobs.example.org"
    assert proc.stderr.startswith("jobsyncd: warning: ")
    quiet = run(cli, "-q", "--config", str(cfg), "status", "--json")
    assert quiet.stderr == ""


def test_the_data_dir_flag_beats_the_env(cli, tmp_path):
    other = tmp_path / "other"
    run(cli, "--data-dir", str(other), "create")
    assert (other / STORE_NAME).exists()
    assert not cli.data_dir.exists()


def test_an_unusable_data_dir_fails_in_one_line(cli, tmp_path):
    blocker = tmp_path / "regular-file"
    blocker.write_text("x")
    for args in (("create",), ("list",), ("status", "--json")):
        proc = run(cli, "--data-dir", str(blocker / "data"), *args, code=1)
        assert str(blocker / "data") in one_error_line(proc)
        assert proc.stdout == ""


def test_a_symlink_planted_at_the_store_fails_naming_the_path(cli, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    cli.data_dir.mkdir(mode=0o700)
    (cli.data_dir / STORE_NAME).symlink_to(victim)
    for args in (("create",), ("list",), ("compact",)):
        proc = run(cli, *args, code=1)
        assert str(cli.data_dir / STORE_NAME) in one_error_line(proc)
    assert victim.read_text() == "precious\n"


def test_very_verbose_shows_a_traceback_for_an_error(cli):
    proc = cli("-vv", "show", "no-such-job")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert "jobsyncd: error:" in proc.stderr


# ---- damaged store through the CLI -----------------------------------------------------------


def test_a_torn_last_line_is_warned_about_and_repaired_by_the_next_create(cli):
    first = run(cli, "create", "--text", "first").stdout.strip()
    with open(cli.data_dir / STORE_NAME, "ab") as fh:
        fh.write(b'{"local_id":"abc')
    proc = run(cli, "list", "--json")
    assert [json.loads(line)["local_id"] for line in proc.stdout.splitlines()] == [first]
    assert "jobsyncd: warning:" in proc.stderr
    second = run(cli, "create", "--text", "second").stdout.strip()
    proc = run(cli, "list", "--json")
    assert proc.stderr == ""
    assert [json.loads(line)["local_id"] for line in proc.stdout.splitlines()] == [first, second]


def test_an_unparseable_middle_line_is_set_aside_and_dropped_by_the_next_cli_write(cli):
    first = run(cli, "create", "--text", "first").stdout.strip()
    second = run(cli, "create", "--text", "second").stdout.strip()
    # A bad line between two good ones, as a disk error would leave it (a store write repairs
    # an unreadable *last* line before appending, so it never ends up in the middle itself).
    lines = (cli.data_dir / STORE_NAME).read_bytes().splitlines(keepends=True)
    (cli.data_dir / STORE_NAME).write_bytes(lines[0] + b"this is not json\n" + lines[1])
    proc = run(cli, "list", "--json")
    assert [json.loads(line)["local_id"] for line in proc.stdout.splitlines()] == [first, second]
    asides = list(cli.data_dir.glob(STORE_NAME + ".corrupt-*"))
    assert len(asides) == 1
    assert str(asides[0]) in proc.stderr and proc.stderr.startswith("jobsyncd: warning:")
    # Contract section 4: dropped from the store on the next write.
    third = run(cli, "create", "--text", "third").stdout.strip()
    assert b"this is not json" not in (cli.data_dir / STORE_NAME).read_bytes()
    proc = run(cli, "list", "--json")
    assert proc.stderr == ""
    assert [json.loads(line)["local_id"] for line in proc.stdout.splitlines()] == [first, second, third]


def test_a_complete_but_unparseable_last_line_is_repaired_by_the_next_cli_write(cli):
    first = run(cli, "create", "--text", "first").stdout.strip()
    with open(cli.data_dir / STORE_NAME, "ab") as fh:
        fh.write(b'{"local_id": "half a record\n')
    proc = run(cli, "list", "--json")
    assert [json.loads(line)["local_id"] for line in proc.stdout.splitlines()] == [first]
    assert proc.stderr.startswith("jobsyncd: warning:")
    second = run(cli, "create", "--text", "second").stdout.strip()
    assert b"half a record" not in (cli.data_dir / STORE_NAME).read_bytes()
    proc = run(cli, "list", "--json")
    assert proc.stderr == ""
    assert [json.loads(line)["local_id"] for line in proc.stdout.splitlines()] == [first, second]


def test_a_symlink_planted_at_the_audio_folder_is_refused(cli, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    src = tmp_path / "a.wav"
    src.write_bytes(b"audio")
    run(cli, "create")
    (cli.data_dir / "audio").symlink_to(elsewhere)
    proc = run(cli, "create", "--audio", str(src), code=1)
    assert str(cli.data_dir / "audio") in one_error_line(proc)
    assert list(elsewhere.iterdir()) == []
    assert len(cli.jobs()) == 1


def test_no_command_at_all_is_a_one_line_usage_error(cli):
    proc = cli()
    assert proc.returncode == 2
    assert proc.stderr.startswith("jobsyncd: error:") and proc.stderr.count("\n") == 1


def test_compact_removes_old_audio_copies_no_job_names_and_keeps_the_rest(cli, tmp_path):
    src = tmp_path / "a.wav"
    src.write_bytes(b"RIFFsound")
    local_id = run(cli, "create", "--audio", str(src)).stdout.strip()
    audio = cli.data_dir / "audio"
    kept = next(audio.iterdir())
    old_orphan = audio / "0000-left-by-a-crash.wav"
    new_orphan = audio / "1111-a-create-in-progress.wav"
    for orphan in (old_orphan, new_orphan):
        orphan.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old_orphan, (two_hours_ago, two_hours_ago))
    os.utime(kept, (two_hours_ago, two_hours_ago))
    outside = tmp_path / "outside.wav"
    outside.write_bytes(b"not ours")
    proc = run(cli, "compact")
    assert "removed 1 audio file" in proc.stdout
    assert kept.exists() and new_orphan.exists() and not old_orphan.exists()
    assert outside.exists() and src.exists()
    assert json.loads(run(cli, "show", local_id, "--json").stdout)["audio_file"] == str(kept)
