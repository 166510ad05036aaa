"""Fuzzing the command line (issue 9 item 12): whatever the arguments, jobsyncd answers with a
contract exit code and one-line messages, never the generic "unexpected" handler.

Runs `jobsyncd.cli.main` in-process (thousands of runs in seconds) against a private data dir,
config dir and a server URL nobody listens on; `daemon` and `demo` are left out (they run until
stopped), every other command and option is drawn, with hostile values among the ordinary ones.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobsyncd import cli as cli_module

CODES = {0, 1, 2, 75, 77, 78}
COMMANDS = [
    ["create"], ["update"], ["delete"], ["list"], ["show"], ["retry"], ["status"],
    ["compact"], ["sync"], ["config", "show"], ["config", "init"], ["config", "check"],
]
OPTIONS = [
    "--text", "--text-file", "--edit", "--audio", "--no-audio", "--meta", "--unset-meta",
    "--json", "--status", "--limit", "--reverse", "--search", "--all", "--force-delete",
    # No --data-dir: a generated "/" or "/nonexistent/x" would act on the real file system
    # (tests/system/test_cli_input.py covers odd data dirs inside a temporary directory).
    "--wait", "--config", "--server", "-q", "-v", "--help", "--",
]
HOSTILE = [
    "", "-", "=", "k=", "k=1e400", "k=" + "[" * 40 + "]" * 40, "k=NaN", "n=3", "x=" + "9" * 400,
    "nan", "inf", "-1", "0", "1e12", "99999999999999999999", "pending", "failed",
    "http://[::1", "http://127.0.0.1:99999", "http://127.0.0.1:9", "https://a..b", "ftp://x",
    "/nonexistent/file", "/dev/null", "/", "abcdef", "ABCDEF12", "00000000-0000-4000-8000-000000000000",
    "\udcff\udcfe", "caf\udce9", "\x7f", "a\u0085b", "\U0001f600", "'\"\\", "%s%n", "-vv",
]
token = st.one_of(st.sampled_from(OPTIONS), st.sampled_from(HOSTILE), st.text(max_size=12))


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("JOBSYNCD_") or key in ("NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY",
                                                 "STATE_DIRECTORY", "JOURNAL_STREAM"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("JOBSYNCD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JOBSYNCD_SERVER_URL", "http://127.0.0.1:9")  # refused at once
    monkeypatch.setenv("JOBSYNCD_REQUEST_TIMEOUT_SECONDS", "2")
    monkeypatch.setenv("EDITOR", "false")
    monkeypatch.setenv("VISUAL", "false")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "audio.wav").write_bytes(b"RIFF")
    return tmp_path


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO(b"text from stdin\n"), encoding="utf-8")
    old_stdin = sys.stdin
    sys.stdin = stdin
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_module.main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdin = old_stdin
        cli_module.log.configure()
    return code, out.getvalue(), err.getvalue()


@settings(
    max_examples=int(os.environ.get("JOBSYNCD_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(command=st.sampled_from(COMMANDS), args=st.lists(token, max_size=6), seed_job=st.booleans())
def test_any_command_line_gets_a_contract_exit_code_and_one_line_messages(
    sandbox, command, args, seed_job
):
    if seed_job:
        run_main(["create", "--text", "seed", "--meta", "a=1"])
    argv = command + args
    verbose = sum(a.count("v") for a in argv if a.startswith("-v") and set(a[1:]) == {"v"})
    verbose += argv.count("--verbose")
    code, out, err = run_main(argv)
    assert code in CODES, (argv, code, err)
    assert "error: unexpected " not in err, (argv, err)  # the generic handler's words
    if verbose >= 2:
        return  # -vv may print tracebacks by design
    assert "Traceback" not in err, (argv, err)
    if "--help" in argv and code == 0:
        return
    for line in err.splitlines():
        assert line.startswith("jobsyncd: "), (argv, err)
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("jobsyncd: error: ")]
        assert len(errors) == 1, (argv, err)


KEYS = ["server_url", "token_file", "interval_seconds", "max_retries", "backoff_base_seconds",
        "request_timeout_seconds", "verify_tls", "ca_bundle", "allow_insecure_http", "live",
        "upload_chunk_bytes", "data_dir", "intervall", "[table]"]
VALUES = ["1", "0", "-1", "1e400", "nan", "inf", "true", '"yes"', '"\\u0000"', '"http://[::1"',
          "[1, 2]", "{a = 1}", '"/dev/zero"', '"~"', "2147483648", "0.5", "1979-05-27"]
config_line = st.one_of(
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(KEYS), st.sampled_from(VALUES)),
    st.text(max_size=20),
)


@settings(
    max_examples=int(os.environ.get("JOBSYNCD_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    lines=st.lists(config_line, max_size=5),
    raw=st.binary(max_size=30),
    use_raw=st.booleans(),
    command=st.sampled_from([["list"], ["status", "--json"], ["sync"], ["config", "show"]]),
)
def test_any_config_file_gets_a_contract_exit_code_and_one_line_messages(
    sandbox, lines, raw, use_raw, command
):
    config = sandbox / "fuzz.toml"
    config.write_bytes(raw if use_raw else "\n".join(lines).encode("utf-8", "surrogatepass"))
    os.chmod(config, 0o600)
    code, out, err = run_main(["--config", str(config), *command])
    assert code in CODES, (command, code, err)
    assert "error: unexpected " not in err and "Traceback" not in err, err
    for line in err.splitlines():
        assert line.startswith("jobsyncd: "), err
