"""A clock set back (contract 6.9): a back-off window recorded while the clock was a day ahead
counts as over at once, one inside the 1 h a Retry-After may ask is still honoured. The installed
`jobsyncd sync` against the fault server on loopback.
"""

from __future__ import annotations

import json
import os
import time

import pytest

pytestmark = pytest.mark.timeout(60)


def record_backoff(cli, until: float) -> None:
    cli.data_dir.mkdir(mode=0o700, exist_ok=True)
    path = cli.data_dir / "backoff.json"
    path.write_text(json.dumps({"until": until}))
    os.chmod(path, 0o600)


def test_a_back_off_window_recorded_a_day_ahead_counts_as_over_and_the_sync_runs(cli, fault_server):
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    lid = cli("create", "--text", "stranded?", check=True).stdout.strip()
    record_backoff(cli, time.time() + 86_400)
    proc = cli("sync", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["skipped"] is None
    assert fault_server.job_by_local_id(lid) is not None


def test_a_back_off_window_within_the_hour_is_still_honoured_without_a_request(cli, fault_server):
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    cli("create", "--text", "wait", check=True)
    record_backoff(cli, time.time() + 1800)
    proc = cli("sync", "--json")
    assert proc.returncode == 75, proc.stderr
    assert json.loads(proc.stdout)["skipped"] == "backoff"
    assert fault_server.requests == []
