"""The notify protocol against real AF_UNIX datagram sockets (a path and an @abstract name)."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobsyncd.notify import MAX_DATAGRAM_BYTES, Notifier


class Listener:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def notifier(self, **extra_env: str) -> Notifier:
        return Notifier.from_env({"NOTIFY_SOCKET": self.env_value, **extra_env})

    def receive(self) -> bytes:
        return self.sock.recv(2 * MAX_DATAGRAM_BYTES)

    def assert_nothing_received(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(2 * MAX_DATAGRAM_BYTES)
        finally:
            self.sock.settimeout(2)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes; pytest's tmp_path for a long test name can exceed that.
    with tempfile.TemporaryDirectory(prefix="jsn-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
def path_listener(short_dir: Path) -> Iterator[Listener]:
    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        yield Listener(sock, str(path))


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"jobsyncd-test/{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        yield Listener(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Listener:
    return request.getfixturevalue(f"{request.param}_listener")


def test_ready_sends_exactly_ready_1(listener: Listener) -> None:
    assert listener.notifier().ready() is True
    assert listener.receive() == b"READY=1"


def test_stopping_sends_exactly_stopping_1(listener: Listener) -> None:
    listener.notifier().stopping()
    assert listener.receive() == b"STOPPING=1"


def test_watchdog_sends_exactly_watchdog_1(listener: Listener) -> None:
    listener.notifier().watchdog()
    assert listener.receive() == b"WATCHDOG=1"


def test_status_sends_the_text_as_one_assignment(listener: Listener) -> None:
    listener.notifier().status("last pass 12:00:03Z: ok, 2 created, 0 errors")
    assert listener.receive() == b"STATUS=last pass 12:00:03Z: ok, 2 created, 0 errors"


def test_status_text_is_utf8(listener: Listener) -> None:
    listener.notifier().status("offline – nächster Versuch")
    assert listener.receive() == "STATUS=offline – nächster Versuch".encode()


def test_status_with_newlines_cannot_smuggle_other_assignments(listener: Listener) -> None:
    listener.notifier().status("offline\nREADY=1\r\nSTOPPING=1\0WATCHDOG=1")
    assert listener.receive() == b"STATUS=offline READY=1 STOPPING=1 WATCHDOG=1"


def test_an_overlong_status_is_cut_to_what_systemd_accepts(listener: Listener) -> None:
    listener.notifier().status("é" * MAX_DATAGRAM_BYTES)
    datagram = listener.receive()
    assert len(datagram) <= MAX_DATAGRAM_BYTES
    assert datagram.startswith(b"STATUS=\xc3\xa9")
    datagram.decode("utf-8")  # not cut inside a character


def test_reloading_sends_reloading_with_the_monotonic_time_in_microseconds(
    listener: Listener,
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    listener.notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    first, second = listener.receive().split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_a_reload_is_reloading_then_ready_as_two_datagrams(listener: Listener) -> None:
    notifier = listener.notifier()
    notifier.reloading()
    notifier.ready()
    assert listener.receive().startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert listener.receive() == b"READY=1"


def test_from_env_reads_os_environ_by_default(
    path_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    Notifier.from_env().ready()
    assert path_listener.receive() == b"READY=1"


def test_an_abstract_name_is_sent_to_the_abstract_namespace_not_a_file(
    abstract_listener: Listener,
) -> None:
    notifier = abstract_listener.notifier()
    assert notifier.address is not None and notifier.address.startswith("\0")
    assert not os.path.exists(abstract_listener.env_value)


@pytest.mark.parametrize("value", [None, ""])
def test_without_notify_socket_every_method_is_a_silent_no_op(value: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False


@pytest.mark.parametrize("value", ["notify.sock", "@", "/", "vsock:2:1234"])
def test_a_notify_socket_that_is_neither_absolute_path_nor_at_name_is_ignored(
    value: str,
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_a_missing_socket_is_logged_at_debug_and_never_raised(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(short_dir / "gone")})
    with caplog.at_level(logging.DEBUG, logger="jobsyncd.notify"):
        assert notifier.ready() is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "READY=1" in caplog.text


def test_a_socket_of_the_wrong_type_does_not_raise(short_dir: Path) -> None:
    path = short_dir / "stream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        assert Notifier.from_env({"NOTIFY_SOCKET": str(path)}).ready() is False


def test_an_overlong_socket_path_does_not_raise() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/" + "x" * 200})
    assert notifier.ready() is False


def test_a_full_receive_queue_drops_the_message_instead_of_blocking(
    path_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("jobsyncd.notify.SEND_TIMEOUT_SECONDS", 0.05)
    notifier = path_listener.notifier()
    deadline = time.monotonic() + 10
    # Nobody reads the listener, so its queue fills up; each send must then fail fast.
    while notifier.watchdog():
        assert time.monotonic() < deadline, "the queue never filled"
    started = time.monotonic()
    assert notifier.watchdog() is False
    assert time.monotonic() - started < 1


# watchdog_interval: sd_watchdog_enabled(3) semantics, halved into seconds.

SOCKET = {"NOTIFY_SOCKET": "/run/systemd/notify"}


def test_watchdog_interval_is_half_of_watchdog_usec_in_seconds() -> None:
    notifier = Notifier.from_env({**SOCKET, "WATCHDOG_USEC": "60000000"})
    assert notifier.watchdog_interval() == 30.0


def test_watchdog_interval_keeps_fractions_of_a_second() -> None:
    notifier = Notifier.from_env({**SOCKET, "WATCHDOG_USEC": "1500000"})
    assert notifier.watchdog_interval() == 0.75


def test_watchdog_interval_applies_when_watchdog_pid_is_ours() -> None:
    env = {**SOCKET, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval() == 30.0


def test_watchdog_interval_is_none_when_watchdog_pid_is_another_process() -> None:
    env = {**SOCKET, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(env).watchdog_interval() is None


def test_watchdog_interval_is_none_when_watchdog_pid_is_not_a_number() -> None:
    env = {**SOCKET, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "self"}
    assert Notifier.from_env(env).watchdog_interval() is None


def test_watchdog_interval_is_none_without_watchdog_usec() -> None:
    assert Notifier.from_env(SOCKET).watchdog_interval() is None
    assert (
        Notifier.from_env({**SOCKET, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() is None
    )


@pytest.mark.parametrize(
    "value", ["", "0", "-5", "+5", " 60", "6_000_000", "60s", "1e6", "30.5", "infinity", "²"]
)
def test_watchdog_interval_is_none_when_watchdog_usec_is_invalid(value: str) -> None:
    assert Notifier.from_env({**SOCKET, "WATCHDOG_USEC": value}).watchdog_interval() is None


def test_watchdog_interval_is_none_without_a_socket_to_ping() -> None:
    assert Notifier.from_env({"WATCHDOG_USEC": "60000000"}).watchdog_interval() is None


def test_the_notifier_is_an_immutable_value() -> None:
    notifier = Notifier.from_env(SOCKET)
    with pytest.raises(AttributeError):
        notifier.address = None  # type: ignore[misc]
    assert Notifier.from_env(SOCKET) == notifier
