"""`jobsyncd demo`: the README's first command must work and clean up after itself."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def test_the_demo_runs_the_whole_loop_and_leaves_no_process_or_file_behind(cli):
    # The configured server and data dir must be ignored: point them somewhere unusable.
    cli.env["JOBSYNCD_SERVER_URL"] = "http://192.0.2.1:9"
    cli.env["JOBSYNCD_DATA_DIR"] = str(cli.data_dir)
    proc = cli("demo", timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("reference job server", "Creating three jobs", "on the server", "Editing a job",
                 "deletes job", "notices the deletion", "jobsyncd status", "Stopped the daemon"):
        assert step in out, f"the demo did not narrate {step!r}:\n{out}"
    root = re.search(r"Everything happens in (\S+);", out).group(1)
    assert not os.path.exists(root), "the demo left its temporary directory behind"
    assert _processes_mentioning(root) == [], "the demo left a process behind"
    assert not cli.data_dir.exists() or not any(cli.data_dir.iterdir()), "the demo touched the user's data dir"


def test_the_demo_ignores_a_broken_user_config(cli, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("this is [not toml\n")
    cli.env["JOBSYNCD_CONFIG"] = str(config)
    proc = subprocess.run([cli.binary, "demo"], env=cli.env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
