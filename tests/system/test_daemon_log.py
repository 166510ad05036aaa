"""The daemon's log without -v (issue 10 item 6; contract section 5): idle passes are not logged,
a pass that changed something is, and being offline is logged when it begins and when it ends."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from faultserver import FaultProxy, FaultServer
from helpers import poll


def listings(srv: FaultServer) -> int:
    return sum(1 for m, p, _ in srv.requests if m == "GET" and p.split("?")[0] == "/api/v1/jobs")


def test_an_idle_daemon_logs_no_pass_and_offline_only_when_it_begins_and_ends(cli, tmp_path):
    log_path = tmp_path / "daemon.log"
    with FaultServer() as srv, FaultProxy("127.0.0.1", srv.port) as px:
        with open(log_path, "w") as log:
            proc = cli.popen(
                "--server", px.url, "daemon", "--interval", "1",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )
        try:
            poll(lambda: listings(srv) >= 3, 20, "three idle passes")
            text = Path(log_path).read_text()
            assert "started" in text and " pass " not in text, text
            local_id = cli("create", "--text", "x", check=True).stdout.strip()
            poll(lambda: srv.job_by_local_id(local_id), 10, "the job reached the server")
            poll(lambda: "1 created" in Path(log_path).read_text(), 10, "the pass is logged")
            px.closed = True
            poll(lambda: "skipped (offline)" in Path(log_path).read_text(), 10, "offline logged")
            offline_passes: set[str] = set()

            def three_offline_passes() -> bool:
                last = json.loads((cli.data_dir / "last_pass.json").read_text())
                if last.get("skipped") == "offline":
                    offline_passes.add(last["finished_at"])
                return len(offline_passes) >= 3

            poll(three_offline_passes, 20, "three offline passes")
            before = len(srv.requests)
            px.reopen()
            poll(lambda: "no longer unreachable" in Path(log_path).read_text(), 10, "back online")
            assert len(srv.requests) > before
            poll(lambda: listings(srv) >= 6, 20, "more idle passes")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    lines = Path(log_path).read_text().splitlines()
    assert sum("skipped (offline)" in ln for ln in lines) == 1, lines
    assert sum("cannot reach" in ln for ln in lines) == 1, lines
    assert not [ln for ln in lines if "pass ok: 0 created, 0 updated" in ln], lines
