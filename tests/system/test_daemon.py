"""`jobsyncd daemon` as a real process: the lock, wake-ups, coalescing, reloads, signals,
back-off, the notify protocol and its log (CONTRACT sections 2 and 5).

Every daemon runs with `--interval 60` (or a config interval) so that a pass seen within a few
seconds can only come from a wake-up; every wait is a poll with a deadline; every process is
killed in the `daemons` fixture's teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultserver import FaultServer
from helpers import poll

WAKE_DEADLINE = 3.0  # "within 1 s" in the contract; slack for a noisy machine
PASS_LINE = re.compile(r"jobsyncd: pass (ok|not ok|skipped)")
STARTED_LINE = re.compile(r"jobsyncd: started \(pid (\d+)")


wait_until = poll  # the shared deadline-bounded poll (tests/support/helpers.py)


def listings(srv: FaultServer) -> int:
    """GET requests on the collection (each pass lists once; single-job GETs excluded)."""
    return sum(
        1
        for method, path, _ in srv.requests
        if method == "GET" and path.split("?")[0] == "/api/v1/jobs"
    )


def wait_first_pass(cli) -> dict:
    """The record of the pass the daemon runs at start, once written (status needs no log)."""
    return wait_until(lambda: cli.json("status")["last_pass"], 10, "the pass at start")  # type: ignore[return-value]


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


class DaemonProc:
    """A running `jobsyncd daemon` whose stderr a thread collects line by line."""

    def __init__(self, cli, args: tuple[str, ...], env: dict[str, str]) -> None:
        saved = cli.env
        cli.env = {**saved, **env}
        try:
            self.proc = cli.popen(
                *args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        finally:
            cli.env = saved
        self.pid = self.proc.pid
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def matching(self, pattern: str | re.Pattern[str]) -> list[str]:
        return [line for line in self.lines if re.search(pattern, line)]

    def passes(self) -> int:
        return len(self.matching(PASS_LINE))

    def wait_line(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, count: int = 1
    ) -> list[str]:
        def found() -> list[str] | None:
            hits = self.matching(pattern)
            if len(hits) >= count:
                return hits
            if self.proc.poll() is not None:
                self._reader.join(2)
                hits = self.matching(pattern)
                if len(hits) >= count:
                    return hits
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} before logging {pattern!r}:\n{self.log}"
                )
            return None

        try:
            return wait_until(found, timeout, f"log line {pattern!r} x{count}")  # type: ignore[return-value]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log ---\n{self.log}") from None

    def wait_started(self) -> None:
        self.wait_line(STARTED_LINE, timeout=15)

    def wait_passes(self, n: int, timeout: float = 10.0) -> None:
        self.wait_line(PASS_LINE, timeout=timeout, count=n)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 5.0) -> int:
        self.signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(2)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel is slow
            pass
        if self.proc.stderr is not None:
            self._reader.join(2)
            self.proc.stderr.close()


@pytest.fixture
def daemons(cli) -> Iterator[Callable[..., DaemonProc]]:
    """Start `jobsyncd daemon` processes; teardown kills every one still running."""
    started: list[DaemonProc] = []

    def start(
        *global_args: str,
        interval: str | None = "60",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> DaemonProc:
        if "-q" not in global_args:
            global_args = ("-v", *global_args)  # every pass logged, idle ones too (section 5)
        argv = (*global_args, "daemon", *(("--interval", interval) if interval else ()))
        d = DaemonProc(cli, argv, env or {})
        started.append(d)
        if wait:
            d.wait_started()
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def served(cli, fault_server: FaultServer) -> FaultServer:
    """The fault server as the configured server."""
    cli.env["JOBSYNCD_SERVER_URL"] = fault_server.url
    return fault_server


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A bound unix datagram socket in a short temporary dir (sun_path has 108 bytes)."""
    tmp = tempfile.mkdtemp(prefix="jsd-")
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield path, sock
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(tmp)


class Datagrams:
    """Collects what the daemon sends to a notify socket, with arrival times."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got: list[tuple[float, str]] = []

    def pump(self, seconds: float = 0.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.sock.settimeout(max(0.01, min(0.1, deadline - time.monotonic())))
            try:
                data = self.sock.recv(8192)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    return
                continue
            self.got.append((time.monotonic(), data.decode()))

    def messages(self) -> list[str]:
        return [m for _, m in self.got]

    def wait_for(
        self, predicate: Callable[[str], bool], timeout: float = 10.0, after: int = 0
    ) -> int:
        """Index of the first message from `after` on that satisfies predicate."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (_, msg) in enumerate(self.got[after:], start=after):
                if predicate(msg):
                    return i
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no matching notification within {timeout} s; got {self.messages()!r}"
                )
            self.pump(0.05)


# ---- the lock --------------------------------------------------------------------------------


def test_a_second_daemon_on_the_same_data_dir_exits_75_naming_the_first_ones_pid(
    cli, served, daemons
):
    first = daemons()
    proc = cli("daemon", "--interval", "60", timeout=30)
    assert proc.returncode == 75, proc.stderr
    assert "jobsyncd: error:" in proc.stderr
    assert str(first.pid) in proc.stderr
    assert first.proc.poll() is None, "the first daemon must keep running"
    # the loser left the winner's pid file and wake-up socket alone
    assert cli.json("status")["daemon"] == {"running": True, "pid": first.pid}
    wait_first_pass(cli)
    before = listings(served)
    cli("sync", check=True)
    wait_until(lambda: listings(served) > before, WAKE_DEADLINE, "the first daemon still woken")


def test_status_shows_the_daemon_running_with_its_pid_and_not_running_after_it_stops(
    cli, served, daemons
):
    d = daemons()
    assert int(STARTED_LINE.search(d.log).group(1)) == d.pid, "the daemon must not fork"
    report = cli.json("status")
    assert report["daemon"] == {"running": True, "pid": d.pid}
    assert str(d.pid) in cli("status", check=True).stdout
    assert d.stop() == 0
    report = cli.json("status")
    assert report["daemon"] == {"running": False, "pid": None}
    assert "not running" in cli("status", check=True).stdout


# ---- wake-ups --------------------------------------------------------------------------------


def test_create_update_and_delete_each_reach_the_server_within_seconds_despite_a_60_s_interval(
    cli, served, daemons
):
    d = daemons()
    wait_first_pass(cli)
    local_id = cli("create", "--text", "first", check=True).stdout.strip()
    job = wait_until(
        lambda: served.job_by_local_id(local_id), WAKE_DEADLINE, "create on the server"
    )
    assert job["text"] == "first"

    cli("update", local_id, "--text", "second", check=True)
    wait_until(
        lambda: (served.job_by_local_id(local_id) or {}).get("text") == "second",
        WAKE_DEADLINE,
        "update on the server",
    )

    cli("delete", local_id, check=True)
    wait_until(
        lambda: served.job_by_local_id(local_id) is None, WAKE_DEADLINE, "delete on the server"
    )
    wait_until(lambda: cli.jobs() == [], WAKE_DEADLINE, "the deleted record removed here")
    assert d.proc.poll() is None


def test_sync_hands_its_pass_to_the_running_daemon_which_syncs_at_once(cli, served, daemons):
    d = daemons()
    wait_first_pass(cli)
    remote = served.server_create(text="made elsewhere")

    proc = cli("sync", check=True)
    assert str(d.pid) in proc.stdout
    assert "daemon" in proc.stdout.lower()
    wait_until(
        lambda: any(j["server_id"] == remote["id"] for j in cli.jobs()),
        WAKE_DEADLINE,
        "the daemon pulled the job",
    )

    before = listings(served)
    summary = json.loads(cli("sync", "--json", check=True).stdout)
    assert summary["handed_to_daemon"] == d.pid
    assert summary["ok"] is True
    assert summary["skipped"] is None
    assert all(
        summary[k] == 0
        for k in (
            "created",
            "updated",
            "deleted_remote",
            "deleted_locally",
            "pulled",
            "errors",
            "failed",
        )
    )
    wait_until(lambda: listings(served) > before, WAKE_DEADLINE, "a pass after sync --json")


def test_sigusr1_makes_the_daemon_sync_at_once(cli, served, daemons):
    d = daemons()
    wait_first_pass(cli)
    before = listings(served)
    d.signal(signal.SIGUSR1)
    wait_until(lambda: listings(served) > before, WAKE_DEADLINE, "a pass after SIGUSR1")
    assert d.proc.poll() is None


def test_each_pass_is_logged_as_soon_as_it_ends(cli, served, daemons):
    d = daemons()
    for n in range(1, 6):
        if n > 1:
            d.signal(signal.SIGUSR1)
        wait_until(lambda n=n: listings(served) == n, WAKE_DEADLINE, f"pass {n} on the server")
        d.wait_passes(n, timeout=WAKE_DEADLINE)
        assert d.passes() == n


def test_wake_ups_during_a_busy_pass_give_one_more_pass_not_one_each(cli, served, daemons):
    d = daemons()
    wait_first_pass(cli)
    assert listings(served) == 1
    held = threading.Event()
    try:
        fault = served.add_fault("POST", r"/api/v1/jobs", times=1, delay_event=held)
        first = cli("create", "--text", "held", check=True).stdout.strip()
        wait_until(lambda: fault.hits == 1, WAKE_DEADLINE, "the pass holding on POST")
        ids = [cli("create", "--text", f"burst {i}", check=True).stdout.strip() for i in range(10)]
        for _ in range(5):
            d.signal(signal.SIGUSR1)
            time.sleep(0.02)
        time.sleep(0.3)  # let every wake-up reach the daemon while the pass is still held
        assert listings(served) == 1, "a second pass ran while the first was held"
    finally:
        held.set()

    # the held pass lists once after its push; the one follow-up pass pushes the burst and lists
    wait_until(
        lambda: all(served.job_by_local_id(i) for i in [first, *ids]),
        WAKE_DEADLINE + 2,
        "the burst pushed by a follow-up pass",
    )
    wait_until(lambda: listings(served) >= 3, WAKE_DEADLINE, "the follow-up pass's listing")
    time.sleep(1.5)  # a quiet spell: any further pass would show up here
    assert listings(served) == 3, f"passes after the held one: {listings(served) - 2}\n{d.log}"
    assert served.count("POST") == 11
    assert all(j["sync_status"] == "synced" for j in cli.jobs())


# ---- reload ----------------------------------------------------------------------------------


def test_sighup_with_a_new_server_url_sends_the_next_pass_to_the_new_server(
    cli, fault_server, daemons, tmp_path
):
    config = tmp_path / "config.toml"
    write_private(config, f'server_url = "{fault_server.url}"\n')
    cli.env["JOBSYNCD_CONFIG"] = str(config)
    d = daemons()
    wait_first_pass(cli)
    assert listings(fault_server) == 1

    with FaultServer() as second:
        write_private(config, f'server_url = "{second.url}"\n')
        d.signal(signal.SIGHUP)
        line = d.wait_line(r"jobsyncd: reloaded")[0]
        assert second.url in line
        wait_until(lambda: listings(second) >= 1, WAKE_DEADLINE, "a pass on the new server")
        local_id = cli("create", "--text", "after reload", check=True).stdout.strip()
        wait_until(
            lambda: second.job_by_local_id(local_id), WAKE_DEADLINE, "the job on the new server"
        )
        assert fault_server.job_by_local_id(local_id) is None
        assert listings(fault_server) == 1
        assert d.stop() == 0


def test_sighup_with_a_shorter_interval_schedules_passes_at_the_new_interval(
    cli, served, daemons, tmp_path
):
    config = tmp_path / "config.toml"
    write_private(config, "interval_seconds = 60\n")
    cli.env["JOBSYNCD_CONFIG"] = str(config)
    d = daemons(interval=None)
    wait_first_pass(cli)
    write_private(config, "interval_seconds = 1\n")  # the contract's least interval
    d.signal(signal.SIGHUP)
    d.wait_line(r"jobsyncd: reloaded .*interval 1 s")
    d.wait_passes(4, timeout=10)  # the reload's own pass and then one every second


def test_sighup_with_a_broken_config_is_refused_and_the_daemon_keeps_the_old_server(
    cli, fault_server, daemons, tmp_path
):
    config = tmp_path / "config.toml"
    write_private(config, f'server_url = "{fault_server.url}"\n')
    cli.env["JOBSYNCD_CONFIG"] = str(config)
    d = daemons()
    wait_first_pass(cli)

    write_private(config, 'server_url = "http://127.0.0.1:1\n[[[ not toml\n')
    d.signal(signal.SIGHUP)
    line = d.wait_line(r"jobsyncd: error: .*reload")[0]
    assert "refus" in line
    assert d.proc.poll() is None
    assert not d.matching(r"jobsyncd: reloaded")

    before = listings(fault_server)
    d.signal(signal.SIGUSR1)
    wait_until(lambda: listings(fault_server) > before, WAKE_DEADLINE, "a pass on the old server")
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_sighup_with_a_new_token_file_recovers_from_a_401(cli, daemons, tmp_path):
    token_file = tmp_path / "token"
    write_private(token_file, "wrong-token\n")
    config = tmp_path / "config.toml"
    with FaultServer(token="right-token") as srv:
        write_private(config, f'server_url = "{srv.url}"\ntoken_file = "{token_file}"\n')
        cli.env["JOBSYNCD_CONFIG"] = str(config)
        d = daemons()
        assert wait_first_pass(cli)["skipped"] == "auth"
        d.wait_line(r"jobsyncd: error: ", timeout=WAKE_DEADLINE)
        assert d.proc.poll() is None, "a 401 must not stop the daemon"
        assert "wrong-token" not in d.log and "right-token" not in d.log

        # tries again on the next wake-up, still running, still logging an error
        errors = len(d.matching(r"jobsyncd: error:"))
        d.signal(signal.SIGUSR1)
        d.wait_line(r"jobsyncd: error:", count=errors + 1, timeout=WAKE_DEADLINE)
        assert d.proc.poll() is None

        write_private(token_file, "right-token\n")
        d.signal(signal.SIGHUP)
        d.wait_line(r"jobsyncd: reloaded")
        d.wait_line(r"jobsyncd: pass ok", timeout=WAKE_DEADLINE)
        assert "right-token" not in d.log
        assert d.stop() == 0


# ---- stopping --------------------------------------------------------------------------------


def test_sigterm_during_a_delayed_server_answer_stops_within_5_s_with_the_store_intact(
    cli, served, daemons
):
    ids = [cli("create", "--text", f"job {i}", check=True).stdout.strip() for i in range(3)]
    never = threading.Event()
    fault = served.add_fault("POST", r"/api/v1/jobs", times=None, delay_event=never)
    d = daemons()
    wait_until(lambda: fault.hits >= 1, 10, "a POST in flight")

    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    try:
        code = d.proc.wait(5.5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the daemon did not stop within 5 s of SIGTERM:\n{d.log}")
    elapsed = time.monotonic() - t0
    assert code == 0, d.log
    assert elapsed < 5.0

    jobs = cli.jobs()
    assert sorted(j["local_id"] for j in jobs) == sorted(ids)
    assert all(j["sync_status"] in ("pending", "synced", "error") for j in jobs)
    assert cli.json("status")["daemon"]["running"] is False

    served.clear_faults()
    again = daemons()  # the lock was released
    wait_until(
        lambda: all(served.job_by_local_id(i) for i in ids),
        10,
        "the abandoned jobs pushed by the next daemon",
    )
    assert again.stop() == 0
    assert len(served.snapshot()) == 3, "the idempotent create made no duplicates"


def test_sigint_stops_the_daemon_with_exit_0(cli, served, daemons):
    d = daemons()
    wait_first_pass(cli)
    d.signal(signal.SIGINT)
    assert d.proc.wait(5) == 0
    assert cli.json("status")["daemon"]["running"] is False
    assert "Traceback" not in d.log


# ---- configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "server_url",
    [None, "http://jobs.example.org", "http://192.0.2.10:8080"],
    ids=["no server url", "http to a host name", "http to a public address"],
)
def test_the_daemon_exits_78_at_start_on_a_bad_server_url(cli, server_url):
    if server_url:
        cli.env["JOBSYNCD_SERVER_URL"] = server_url
    proc = cli("daemon", "--interval", "60", timeout=20)
    assert proc.returncode == 78, proc.stderr
    assert re.search(r"^(\S+ )?jobsyncd: error: .*(server|http)", proc.stderr, re.M), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cli.data_dir / "daemon.pid").exists()


def test_the_daemon_exits_78_at_start_on_an_invalid_config_file(cli, fault_server, tmp_path):
    config = tmp_path / "config.toml"
    write_private(config, f'server_url = "{fault_server.url}"\ninterval_seconds = "often"\n')
    cli.env["JOBSYNCD_CONFIG"] = str(config)
    proc = cli("daemon", timeout=20)
    assert proc.returncode == 78, proc.stderr
    assert re.search(r"^(\S+ )?jobsyncd: error: ", proc.stderr, re.M), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cli.data_dir / "daemon.pid").exists()


# ---- errors from the server ------------------------------------------------------------------


def test_a_401_keeps_the_daemon_running_and_logs_an_error(cli, daemons):
    with FaultServer(token="right-token") as srv:
        cli.env["JOBSYNCD_SERVER_URL"] = srv.url
        cli.env["JOBSYNCD_TOKEN"] = "wrong-token"
        d = daemons()
        assert wait_first_pass(cli)["skipped"] == "auth"
        assert len(srv.all_requests) >= 1  # the probes count here: they met the 401
        time.sleep(0.5)
        assert d.proc.poll() is None, f"the daemon stopped on a 401:\n{d.log}"
        d.wait_line(r"jobsyncd: error: ", timeout=WAKE_DEADLINE)
        assert "wrong-token" not in d.log
        assert d.stop() == 0


def test_a_429_with_retry_after_holds_every_request_and_wake_ups_give_one_pass_when_it_ends(
    cli, served, daemons
):
    d = daemons()
    wait_first_pass(cli)
    fault = served.add_fault(
        "GET", r"/api/v1/jobs", times=1, status=429, headers={"Retry-After": "2"}
    )
    d.signal(signal.SIGUSR1)
    wait_until(lambda: fault.hits == 1, WAKE_DEADLINE, "the 429")
    seen = served.count()
    t429 = served.arrivals[seen - 1]  # the 429's arrival, on the server's clock
    wait_until(
        lambda: (cli.json("status")["last_pass"] or {}).get("skipped") == "backoff",
        WAKE_DEADLINE,
        "the 429 pass recorded",
    )

    # wake-ups inside the window
    local_id = cli("create", "--text", "in the window", check=True).stdout.strip()
    d.signal(signal.SIGUSR1)
    cli("update", local_id, "--text", "still in the window", check=True)

    first_after = None
    deadline = t429 + 8
    while time.monotonic() < deadline:
        if served.count() > seen:
            first_after = served.arrivals[seen]
            break
        time.sleep(0.005)
    assert first_after is not None, f"no request after the window:\n{d.log}"
    assert first_after - t429 >= 1.8, (
        f"a request {first_after - t429:.2f} s after a 429 with Retry-After: 2"
    )

    assert first_after - t429 < 2 + WAKE_DEADLINE, "the pass owed by the wake-ups came late"
    wait_until(
        lambda: (served.job_by_local_id(local_id) or {}).get("text") == "still in the window",
        5,
        "the job pushed",
    )
    wait_until(lambda: listings(served) >= 3, 5, "the pass after the window listed")
    time.sleep(1.0)  # a quiet spell: any further pass would show up here
    assert listings(served) == 3, (
        f"wake-ups in the window must give one pass (start, the 429, one after):\n{d.log}"
    )
    assert served.count("POST") == 1


def test_a_daemon_started_in_a_back_off_window_left_by_a_one_shot_sync_waits_for_its_end(
    cli, served, daemons
):
    served.add_fault("GET", r"/api/v1/jobs", times=1, status=503, headers={"Retry-After": "2"})
    cli("sync", check=75)
    assert served.count() == 1
    cli("create", "--text", "waits for the window", check=True)
    daemons()
    wait_until(lambda: served.count() > 1, 2 + WAKE_DEADLINE, "the pass after the window")
    # Measured where the requests land: the 503's arrival to the next request's, so time spent
    # by the sync process exiting or the test starting the daemon cannot make it look early.
    the_503, first_after = served.arrivals[:2]
    assert first_after - the_503 >= 1.9, (
        "the daemon contacted the server inside the back-off window"
    )
    wait_until(lambda: served.count("POST") == 1, WAKE_DEADLINE, "the job pushed after the window")


# ---- the notify protocol ---------------------------------------------------------------------


def test_the_daemon_notifies_ready_status_reloading_and_stopping(
    cli, served, daemons, notify_socket
):
    path, sock = notify_socket
    got = Datagrams(sock)
    d = daemons(env={"NOTIFY_SOCKET": path})
    ready = got.wait_for(lambda m: m == "READY=1")
    status = got.wait_for(lambda m: m.startswith("STATUS="), after=ready)
    assert "pass ok" in got.messages()[status]
    assert "\n" not in got.messages()[status]

    d.signal(signal.SIGHUP)
    reloading = got.wait_for(lambda m: m.startswith("RELOADING=1"), after=status)
    fields = dict(line.split("=", 1) for line in got.messages()[reloading].splitlines())
    assert fields["RELOADING"] == "1"
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now_usec - int(fields["MONOTONIC_USEC"]) < 30_000_000
    got.wait_for(lambda m: m == "READY=1", after=reloading + 1)

    assert d.stop() == 0
    got.pump(0.2)
    assert "STOPPING=1" in got.messages()
    assert not any(m.startswith("WATCHDOG") for m in got.messages())


def test_the_daemon_notifies_ready_even_when_the_server_is_unreachable(cli, daemons, notify_socket):
    path, sock = notify_socket
    cli.env["JOBSYNCD_SERVER_URL"] = f"http://127.0.0.1:{closed_port()}"
    got = Datagrams(sock)
    d = daemons(env={"NOTIFY_SOCKET": path})
    got.wait_for(lambda m: m == "READY=1")
    assert wait_first_pass(cli)["skipped"] == "offline"
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_the_watchdog_is_pinged_at_half_of_watchdog_usec(cli, served, daemons, notify_socket):
    path, sock = notify_socket
    got = Datagrams(sock)
    d = daemons(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    ready = got.wait_for(lambda m: m == "READY=1")
    start = got.got[ready][0]
    got.pump(3.0)
    pings = [t for t, m in got.got if m == "WATCHDOG=1" and t >= start]
    assert len(pings) >= 4, got.messages()
    assert len(pings) <= 12, "pinged far more often than every 0.5 s"
    assert d.stop() == 0


def test_no_watchdog_pings_when_watchdog_pid_names_another_process(
    cli, served, daemons, notify_socket
):
    path, sock = notify_socket
    got = Datagrams(sock)
    d = daemons(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    got.wait_for(lambda m: m == "READY=1")
    got.pump(1.0)
    assert "WATCHDOG=1" not in got.messages()
    assert d.stop() == 0


def test_an_abstract_notify_socket_name_works(cli, served, daemons):
    name = f"jobsyncd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        got = Datagrams(sock)
        d = daemons(env={"NOTIFY_SOCKET": "@" + name})
        got.wait_for(lambda m: m == "READY=1")
        assert d.stop() == 0
        got.pump(0.2)
        assert "STOPPING=1" in got.messages()


# ---- the log ---------------------------------------------------------------------------------


def test_under_journal_stream_log_lines_carry_priority_prefixes_and_no_timestamps(cli, daemons):
    cli.env["JOBSYNCD_SERVER_URL"] = f"http://127.0.0.1:{closed_port()}"  # an offline pass warns
    d = daemons(env={"JOURNAL_STREAM": "8:123456"})
    d.wait_passes(1)
    assert d.stop() == 0
    lines = [line for line in d.lines if line.strip()]
    assert lines
    for line in lines:
        assert re.match(r"<[0-7]>jobsyncd: ", line), line
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", line), line
    assert any(line.startswith("<6>jobsyncd: started") for line in lines)
    assert any(line.startswith("<6>jobsyncd: stopped") for line in lines)
    assert any(re.match(r"<[34]>jobsyncd: (warning|error): ", line) for line in lines), lines


def test_a_quiet_daemon_logs_only_errors(cli, served, daemons, tmp_path):
    config = tmp_path / "config.toml"
    write_private(config, "interval_seconds = 60\n")
    cli.env["JOBSYNCD_CONFIG"] = str(config)
    d = daemons("-q", interval=None, wait=False)  # -q leaves the start line out
    wait_first_pass(cli)
    write_private(config, "[[[ not toml\n")
    d.signal(signal.SIGHUP)
    d.wait_line(r"jobsyncd: error: .*reload", timeout=WAKE_DEADLINE)
    assert d.stop() == 0
    assert d.lines, "the refused reload must be logged"
    assert all(re.search(r"jobsyncd: error: ", line) for line in d.lines), d.lines


def test_without_journal_stream_the_daemon_logs_start_pass_and_stop_lines(cli, served, daemons):
    d = daemons()
    wait_first_pass(cli)
    assert d.stop() == 0
    log = d.log
    assert re.search(rf"jobsyncd: started \(pid {d.pid}\b", log)
    assert re.search(r"jobsyncd: pass ok: 0 created", log)
    assert "jobsyncd: stopped" in log
    assert not re.search(r"\x1b\[", log), "no colour"
    assert not any(line.startswith("<") for line in d.lines)
