"""The progress bar: on a terminal for a pass with more than a few dozen jobs, never otherwise."""

from __future__ import annotations

import json
import os
import pty
import subprocess

import pytest

pytestmark = pytest.mark.timeout(60)


def _create_jobs(cli, count: int) -> None:
    script = (
        "import sys; from jobsyncd.store import Store, prepare_data_dir; from jobsyncd.jobs import create_job\n"
        "d = sys.argv[1]; prepare_data_dir(d); s = Store(d)\n"
        f"for i in range({count}): create_job(s, f'job {{i}}', None, {{}})\n"
    )
    python = os.path.join(os.path.dirname(cli.binary), "python")
    subprocess.run([python, "-c", script, str(cli.data_dir)], check=True, env=cli.env, timeout=30)


def _sync_on_a_terminal(cli, *args: str) -> tuple[int, str, str]:
    """Run `jobsyncd sync` with stderr on a pseudo-terminal; returns (exit, stdout, terminal)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [cli.binary, "sync", *args],
            env=cli.env,
            stdout=subprocess.PIPE,
            stderr=follower,
            text=True,
        )
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            seen += chunk
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out, seen.decode(errors="replace")
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)


def test_a_pass_with_many_jobs_shows_a_progress_bar_on_a_terminal(cli, fault_server):
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    _create_jobs(cli, 80)
    code, out, terminal = _sync_on_a_terminal(cli)
    assert code == 0, terminal
    assert "pushing" in terminal and "100%" in terminal
    assert "80 created" in out
    assert len(fault_server.snapshot()) == 80


def test_json_mode_shows_no_progress_bar_even_on_a_terminal(cli, fault_server):
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    _create_jobs(cli, 80)
    code, out, terminal = _sync_on_a_terminal(cli, "--json")
    assert code == 0, terminal
    assert "pushing" not in terminal
    assert json.loads(out)["created"] == 80


def test_a_pass_with_few_jobs_shows_no_progress_bar(cli, fault_server):
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    _create_jobs(cli, 5)
    code, out, terminal = _sync_on_a_terminal(cli)
    assert code == 0, terminal
    assert "pushing" not in terminal
