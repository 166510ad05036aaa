"""Taskwarrior's `task sync` as the peer of a first sync (issue 13): a throw-away taskd on
127.0.0.1 with its own CA (ECDSA keys from GnuTLS's certtool), and per run a fresh taskd user
and a fresh Taskwarrior data dir holding N pending tasks, then `task sync init` timed: the
first sync of N new tasks, sent in one request. Then, as the peer of a pass pushing edits, a
number of those tasks edited and `task sync` timed.

Needs Debian's `taskwarrior`, `taskd` and `gnutls-bin` (`apt-get install taskwarrior taskd
gnutls-bin`); `available()` says whether they are there.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

from _common import stop_process

TEXT = "job number {} with some dictated text"
_CERTS = {
    "ca": "cn = bench CA\nca\ncert_signing_key\nexpiration_days = 2\n",
    "server": (
        "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n"
        "encryption_key\nsigning_key\nexpiration_days = 2\n"
    ),
    "client": "cn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n",
}


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def available() -> bool:
    return all(shutil.which(tool) for tool in ("task", "taskd", "certtool"))


def _run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr or proc.stdout}")
    return proc.stdout


class Taskwarrior:
    """A taskd on a free loopback port (stopped by close()) and N tasks ready to import."""

    def __init__(self, workdir: str, tasks: int) -> None:
        self.root = Path(workdir) / "taskwarrior"
        self.pki = self.root / "pki"
        self.data = self.root / "taskd"
        self.pki.mkdir(parents=True)
        self.data.mkdir()
        self.tasks = tasks
        self.env = {**os.environ, "TASKDDATA": str(self.data)}
        self.runs = 0
        self._make_certs()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        _run(["taskd", "init"], self.env)
        for key in (
            "client.cert",
            "client.key",
            "server.cert",
            "server.key",
            "server.crl",
            "ca.cert",
        ):
            _run(["taskd", "config", "--force", key, str(self.pki / f"{key}.pem")], self.env)
        settings = {
            "log": self.data / "taskd.log",
            "pid.file": self.data / "taskd.pid",
            "server": f"127.0.0.1:{self.port}",
            "request.limit": 256 << 20,  # the default 1 MB refuses 10,000 tasks in one sync
        }
        for key, value in settings.items():
            _run(["taskd", "config", "--force", key, str(value)], self.env)
        _run(["taskd", "add", "org", "Public"], self.env)
        self.proc = subprocess.Popen(
            ["taskd", "server", "--data", str(self.data)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise SystemExit("taskd did not start") from None
                time.sleep(0.05)
        self.entry = _stamp()
        self.uuids = [str(uuid.uuid4()) for _ in range(tasks)]
        self.export = self.root / "tasks.json"
        self._write_tasks(self.export, [TEXT.format(i) for i in range(tasks)], self.entry)
        self.client_env: dict[str, str] | None = None
        self.stored: Path | None = None

    def _write_tasks(self, path: Path, descriptions: list[str], modified: str) -> None:
        with open(path, "w") as out:
            for task_uuid, description in zip(
                self.uuids, descriptions, strict=False
            ):  # edits: the first
                task = {"uuid": task_uuid, "description": description, "status": "pending"}
                task.update(entry=self.entry, modified=modified, project="B")
                out.write(json.dumps(task) + "\n")

    def _make_certs(self) -> None:
        for name, template in _CERTS.items():
            (self.pki / f"{name}.info").write_text(template)
            _run(
                [
                    "certtool",
                    "--generate-privkey",
                    "--key-type",
                    "ecdsa",
                    "--outfile",
                    f"{name}.key.pem",
                ],
                cwd=self.pki,
            )
        _run(
            ["certtool", "--generate-self-signed", "--load-privkey", "ca.key.pem"]
            + ["--template", "ca.info", "--outfile", "ca.cert.pem"],
            cwd=self.pki,
        )
        for name in ("server", "client"):
            _run(
                ["certtool", "--generate-certificate", "--load-privkey", f"{name}.key.pem"]
                + ["--load-ca-certificate", "ca.cert.pem", "--load-ca-privkey", "ca.key.pem"]
                + ["--template", f"{name}.info", "--outfile", f"{name}.cert.pem"],
                cwd=self.pki,
            )
        (self.pki / "crl.info").write_text("expiration_days = 2\n")
        _run(
            ["certtool", "--generate-crl", "--load-ca-privkey", "ca.key.pem"]
            + ["--load-ca-certificate", "ca.cert.pem", "--template", "crl.info"]
            + ["--outfile", "server.crl.pem"],
            cwd=self.pki,
        )

    def first_sync(self) -> float:
        """A new user whose Taskwarrior holds the N tasks: `task sync init`, whole process."""
        self.runs += 1
        user = f"bench{self.runs}"
        added = _run(["taskd", "add", "user", "Public", user], self.env)
        key = re.search(r"[0-9a-f-]{36}", added)
        if key is None:
            raise SystemExit(f"taskd add user: no key in {added!r}")
        client = self.root / f"client{self.runs}"
        (client / "data").mkdir(parents=True)
        rc = client / "taskrc"
        rc.write_text(
            f"data.location={client / 'data'}\nconfirmation=no\nverbose=nothing\n"
            f"taskd.certificate={self.pki / 'client.cert.pem'}\n"
            f"taskd.key={self.pki / 'client.key.pem'}\ntaskd.ca={self.pki / 'ca.cert.pem'}\n"
            f"taskd.server=127.0.0.1:{self.port}\ntaskd.credentials=Public/{user}/{key.group(0)}\n"
            "taskd.trust=ignore hostname\n"
        )
        env = self.client_env = {**os.environ, "TASKRC": str(rc)}
        _run(["task", "import", str(self.export)], env)
        start = time.perf_counter()
        _run(["task", "sync", "init"], env)
        took = time.perf_counter() - start
        self.stored = self.data / "orgs" / "Public" / "users" / key.group(0) / "tx.data"
        self._check_stored(self.tasks)
        return took

    def edits_sync(self, count: int) -> float:
        """`count` of the last first sync's tasks edited (imported again with a new
        description), then `task sync`, whole process: the peer of a pass pushing `count` edits."""
        assert self.client_env is not None and self.stored is not None, "first_sync() first"
        before = self._lines()
        edits = self.root / f"edits{self.runs}.json"
        self._write_tasks(edits, [f"edit {i}" for i in range(count)], _stamp())
        _run(["task", "import", str(edits)], self.client_env)
        start = time.perf_counter()
        _run(["task", "sync"], self.client_env)
        took = time.perf_counter() - start
        self._check_stored(before + count)
        return took

    def _lines(self) -> int:
        return self.stored.read_text().count("\n") if self.stored and self.stored.exists() else 0

    def _check_stored(self, expected: int) -> None:
        if self._lines() < expected:
            raise SystemExit(f"taskd stored {self._lines()} lines, not at least {expected}")

    def close(self) -> None:
        stop_process(self.proc)
