"""The command line against careless and hostile input (issue 9, items 10-12; contract section 2).

Global options after the command, `-q` for cron, JOB references that could name two jobs, and
bad bytes, numbers, URLs and files that must each get one `jobsyncd: error:` line and the
contract's exit code, never the generic "unexpected" handler.
"""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
from pathlib import Path

import pytest

from jobsyncd.model import Job, new_local_id
from jobsyncd.store import Store, prepare_data_dir

ROOT = Path(__file__).resolve().parents[2]


def run(cli, *args: str, code: int = 0, **kw) -> subprocess.CompletedProcess[str]:
    proc = cli(*args, **kw)
    assert proc.returncode == code, (
        f"jobsyncd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "unexpected" not in proc.stderr
    return proc


def run_bytes(cli, *args: bytes | str, code: int) -> subprocess.CompletedProcess[bytes]:
    """Run with raw bytes in argv (what a shell passes for a Latin-1 file name or paste)."""
    proc = subprocess.run(
        [cli.binary, *args], env=cli.env, capture_output=True, timeout=60
    )
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert b"Traceback" not in proc.stderr and b"unexpected" not in proc.stderr
    return proc


def one_error_line(stderr: str | bytes) -> str:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("jobsyncd: error: "), text
    return lines[0]


def seed(cli, *jobs: Job) -> None:
    old = os.umask(0o077)
    try:
        prepare_data_dir(str(cli.data_dir))
        Store(str(cli.data_dir)).append(list(jobs))
    finally:
        os.umask(old)


def seeded(local_id: str | None = None, **kw) -> Job:
    kw.setdefault("created_at", "2026-01-01T00:00:00.000Z")
    kw.setdefault("updated_at", kw["created_at"])
    return Job(local_id=local_id or new_local_id(), **kw)


# ---- item 10: global options after the command, -q for cron ---------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("-q", "sync"),
        ("sync", "-q"),
        ("sync", "--quiet"),
    ],
)
def test_a_quiet_sync_that_succeeds_prints_nothing_at_all(cli, ref_server, argv):
    run(cli, "create", "--text", "for cron")
    cli.env["JOBSYNCD_SERVER_URL"] = ref_server.url
    proc = run(cli, *argv)
    assert proc.stdout == "" and proc.stderr == ""
    assert [j["text"] for j in ref_server.jobs()] == ["for cron"]


def test_a_quiet_sync_with_json_still_prints_the_summary(cli, ref_server):
    proc = run(cli, "sync", "--json", "-q", "--server", ref_server.url)
    assert json.loads(proc.stdout)["ok"] is True


def test_a_quiet_sync_that_fails_says_why_on_stderr_only(cli):
    proc = run(cli, "sync", "-q", "--server", "http://127.0.0.1:9", code=75)
    assert proc.stdout == ""
    one_error_line(proc.stderr)


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_work_after_the_command_as_before_it(cli, tmp_path, where):
    other = tmp_path / "other-data"
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{other}"\n')
    os.chmod(config, 0o600)
    del cli.env["JOBSYNCD_DATA_DIR"]
    opts = ("--config", str(config))
    argv = (*opts, "create", "--text", "x") if where == "before" else ("create", "--text", "x", *opts)
    local_id = run(cli, *argv).stdout.strip()
    assert (other / "jobs.jsonl").read_text().count(local_id) == 1
    data = tmp_path / "third"
    argv = ("show", local_id, "--data-dir", str(data))
    assert "no job matches" in one_error_line(run(cli, *argv, code=1).stderr)


def test_verbose_after_the_command_shows_a_traceback_with_vv(cli):
    proc = cli("show", "nothing-like-it", "-vv")
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # the traceback -vv promises


def test_server_after_the_command_is_used_by_sync(cli):
    proc = run(cli, "sync", "--server", "ftp://example.org", code=78)
    assert "ftp://example.org" in one_error_line(proc.stderr)


def test_the_readme_crontab_line_syncs_and_prints_nothing(cli, ref_server):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```crontab", 1)[1].split("```", 1)[0]
    (line,) = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    command = line.split(None, 5)[5]
    run(cli, "create", "--text", "from cron")
    env = dict(cli.env, JOBSYNCD_SERVER_URL=ref_server.url)
    env["PATH"] = f"{Path(cli.binary).parent}:/usr/bin:/bin"  # cron's PATH plus where pip put it
    proc = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert [j["text"] for j in ref_server.jobs()] == ["from cron"]


def test_the_launchd_one_shot_arguments_sync_and_print_nothing(cli, ref_server):
    with open(ROOT / "launchd" / "org.jobsyncd.sync.plist", "rb") as fh:
        args = plistlib.load(fh)["ProgramArguments"][1:]
    assert args == ["-q", "sync"]
    run(cli, "create", "--text", "from launchd")
    cli.env["JOBSYNCD_SERVER_URL"] = ref_server.url
    proc = run(cli, *args)
    assert (proc.stdout, proc.stderr) == ("", "")
    assert len(ref_server.jobs()) == 1


# ---- item 11: a server id that is also another job's local-id prefix -------------------------


def test_a_server_id_that_is_also_another_jobs_local_id_prefix_is_ambiguous(cli):
    a = seeded(server_id="123456", text="a", sync_status="synced")
    b = seeded("123456" + new_local_id()[6:], text="b")
    seed(cli, a, b)
    for argv in (("show", "123456"), ("delete", "123456")):
        line = one_error_line(run(cli, *argv, code=1).stderr)
        assert a.local_id in line and b.local_id in line
    assert {j["sync_status"] for j in cli.jobs()} == {"synced", "pending"}


def test_a_server_id_that_is_a_prefix_of_its_own_local_id_is_not_ambiguous(cli):
    a = seeded("abcdef" + new_local_id()[6:], server_id="abcdef")
    seed(cli, a)
    assert json.loads(run(cli, "show", "abcdef", "--json").stdout)["local_id"] == a.local_id


def test_a_short_server_id_that_no_local_id_starts_with_still_matches(cli):
    a = seeded(server_id="42")
    b = seeded(server_id="123456")
    seed(cli, a, b, seeded("fedcba" + new_local_id()[6:]))
    assert json.loads(run(cli, "show", "42", "--json").stdout)["local_id"] == a.local_id
    assert json.loads(run(cli, "show", "123456", "--json").stdout)["local_id"] == b.local_id


# ---- item 12: bad input gets a usage or config error, never "unexpected" --------------------

BAD = b"caf\xe9 \xff"  # Latin-1 and a byte no UTF-8 text holds


@pytest.mark.parametrize(
    "argv",
    [
        (b"create", b"--text", BAD),
        (b"create", b"--meta", b"k=" + BAD),
        (b"create", b"--meta", BAD + b"=1"),
        (b"show", BAD),
        (b"delete", b"abcdef" + BAD),
        (b"create", b"--audio", b"/tmp/" + BAD),
    ],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error_that_changes_nothing(cli, argv):
    proc = run_bytes(cli, *argv, code=2)
    assert "not valid UTF-8" in one_error_line(proc.stderr)
    assert proc.stdout == b""
    assert not (cli.data_dir / "jobs.jsonl").exists()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "value",
    [nested(32), nested(500), nested(60_000), '{"a": ' * 40 + "1" + "}" * 40,
     "1e400", "-1e999", "[1, 2e308]", "1" * 400, "1" * 5000],
)
def test_meta_too_deep_or_out_of_the_double_range_is_a_usage_error(cli, value):
    proc = run(cli, "create", "--meta", f"k={value}", code=2)
    one_error_line(proc.stderr)
    assert not (cli.data_dir / "jobs.jsonl").exists()


def test_meta_at_the_depth_and_range_limits_is_stored(cli):
    job = json.loads(
        run(cli, "create", "--meta", f"k={nested(31)}", "--meta", "n=1.7976931348623157e308",
            "--meta", "s=NaN", "--json").stdout
    )
    assert job["metadata"]["n"] == 1.7976931348623157e308
    assert job["metadata"]["s"] == "NaN"  # not JSON: the string itself


def test_update_meta_too_deep_is_a_usage_error_and_changes_nothing(cli):
    local_id = run(cli, "create", "--text", "x").stdout.strip()
    before = (cli.data_dir / "jobs.jsonl").read_bytes()
    run(cli, "update", local_id, "--meta", f"k={nested(40)}", code=2)
    assert (cli.data_dir / "jobs.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    "url",
    ["http://[::1", "http://127.0.0.1:99999", "http://127.0.0.1:0", "http://127.0.0.1:port",
     "https://exa mple.org", "https://a..b", "https://ex%ample.org"],
)
def test_a_server_url_that_does_not_parse_is_a_config_error_and_no_retry_is_counted(cli, url):
    local_id = run(cli, "create", "--text", "x").stdout.strip()
    for _ in range(2):
        line = one_error_line(run(cli, "sync", "--server", url, code=78).stderr)
        assert "server URL" in line
    assert json.loads(run(cli, "show", local_id, "--json").stdout)["retry_count"] == 0
    proc = run(cli, "daemon", "--server", url, code=78, timeout=20)
    assert "server URL" in proc.stderr


def test_a_server_url_that_does_not_parse_in_the_environment_is_a_config_error(cli):
    cli.env["JOBSYNCD_SERVER_URL"] = "http://[::1"
    one_error_line(run(cli, "sync", code=78).stderr)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e12", "0", "0.5", "-3", "soon"])
def test_daemon_interval_outside_1_to_86400_is_a_usage_error(cli, value):
    proc = run(cli, "daemon", "--server", "http://127.0.0.1:9", "--interval", value, code=2, timeout=20)
    assert "--interval" in one_error_line(proc.stderr)
    assert not (cli.data_dir / "daemon.pid").exists()


@pytest.mark.parametrize(
    "text",
    ["interval_seconds = 0.5\n", "interval_seconds = 1e12\n", "max_retries = 0\n",
     "max_retries = 1001\n", "request_timeout_seconds = 3601\n", "backoff_base_seconds = -1\n",
     "upload_chunk_bytes = 1000\n", "upload_chunk_bytes = 2147483648\n", "interval_seconds = nan\n",
     "live = \"yes\"\n"],
)
def test_a_config_value_outside_its_range_is_a_config_error(cli, tmp_path, text):
    config = tmp_path / "c.toml"
    config.write_text(text)
    os.chmod(config, 0o600)
    line = one_error_line(run(cli, "--config", str(config), "list", code=78).stderr)
    assert text.split(" ")[0] in line


@pytest.mark.parametrize(
    "raw",
    [b'server_url = "http://caf\xe9"\n', b"\xff\xfe" + 'x = 1\n'.encode("utf-16-le"),
     b'data_dir = "a\\u0000b"\n'],
)
def test_a_config_file_that_is_not_utf8_or_holds_a_nul_is_a_config_error(cli, tmp_path, raw):
    config = tmp_path / "c.toml"
    config.write_bytes(raw)
    os.chmod(config, 0o600)
    for args in (("list",), ("create",), ("sync",), ("status",)):
        line = one_error_line(run(cli, "--config", str(config), *args, code=78).stderr)
        assert str(config) in line


def test_an_environment_value_that_is_not_utf8_is_a_config_error(cli):
    proc = subprocess.run(
        [cli.binary, "list"],
        env={**{k.encode(): v.encode() for k, v in cli.env.items()}, b"JOBSYNCD_DATA_DIR": b"/tmp/" + BAD},
        capture_output=True, timeout=60,
    )
    assert proc.returncode == 78
    assert b"JOBSYNCD_DATA_DIR" in proc.stderr and b"UTF-8" in proc.stderr


def test_a_misspelt_config_key_warns_with_the_nearest_real_key(cli, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("intervall_seconds = 30\nverfy_tls = false\n")
    os.chmod(config, 0o600)
    proc = run(cli, "--config", str(config), "list")
    assert "did you mean 'interval_seconds'?" in proc.stderr
    assert "did you mean 'verify_tls'?" in proc.stderr


def _read_only(cli, *args: str) -> subprocess.CompletedProcess[str]:
    """Run jobsyncd with its data dir bind-mounted read-only in a private mount namespace."""
    d = str(cli.data_dir)
    script = f'mount --bind -o ro "{d}" "{d}" && exec "$0" "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, cli.binary, *args],
        env=cli.env, capture_output=True, text=True, timeout=30,
    )


def test_daemon_on_a_read_only_data_dir_fails_in_one_line(cli):
    run(cli, "create", "--text", "x")
    probe = _read_only(cli, "status")
    if probe.returncode != 0:
        pytest.skip(f"no private read-only mounts here: {probe.stderr.strip()}")
    for args in (("daemon", "--server", "http://127.0.0.1:9"), ("sync", "--server", "http://127.0.0.1:9"),
                 ("create",), ("compact",)):
        proc = _read_only(cli, *args)
        assert proc.returncode == 1, (args, proc.stderr)
        line = one_error_line(proc.stderr.split("jobsyncd: ", 1)[-1].join(["jobsyncd: ", ""]))
        assert "Read-only file system" in line and "unexpected" not in line


def test_a_shared_directory_given_as_the_data_dir_is_refused_and_its_mode_left_alone(cli, tmp_path):
    """`--data-dir /` or `~` must never chmod the directory: only a directory of jobsyncd's own
    (empty, or holding only its files) is made private."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "notes.txt").write_text("someone else's")
    proc = cli("--data-dir", str(shared), "create", "--text", "x")
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.startswith("jobsyncd: error:") and "notes.txt" in proc.stderr
    assert (shared.stat().st_mode & 0o777) == 0o755
    assert not (shared / "jobs.lock").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    empty.chmod(0o755)
    cli("--data-dir", str(empty), "create", "--text", "x", check=True)
    assert (empty.stat().st_mode & 0o777) == 0o700
