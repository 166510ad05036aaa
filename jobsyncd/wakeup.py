"""Asking a running daemon to sync now, and finding out whether one runs.

The daemon binds a unix datagram socket in the data dir (0700, so only its owner can reach it);
the CLI sends one datagram, fire and forget. No pid is ever signalled, so a stale pid can never
make us signal a process that is not our daemon.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Any

SOCKET_NAME = "daemon.sock"
DAEMON_LOCK_NAME = "daemon.lock"
DAEMON_PID_NAME = "daemon.pid"


def request_sync(data_dir: str) -> bool:
    """Send a wake-up; True if a daemon's socket took it. Never raises, never waits."""
    path = os.path.join(data_dir, SOCKET_NAME)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(b"sync", path)
        return True
    except OSError:
        return False


def daemon_pid(data_dir: str) -> int | None:
    """The pid of the daemon holding the data dir's daemon lock, or None when none runs.

    Probes the lock with a non-blocking shared flock that it releases at once; the daemon
    retries its own acquisition for a moment, so the probe cannot make a starting daemon fail.
    """
    lock = os.path.join(data_dir, DAEMON_LOCK_NAME)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                return None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)
    try:
        with open(os.path.join(data_dir, DAEMON_PID_NAME), encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 0  # held, but the pid is not written yet


# `sync --wait`: the CLI binds a reply socket in the data dir and sends WAIT_PREFIX + its name;
# the daemon acks at once (with its pid and interval) and, when the first pass that starts after
# the request ends, sends that pass's summary and exit code there.
WAIT_PREFIX = b"wait "
_REPLY_NAME_LENGTH = len("wait-") + 16 + len(".sock")


def reply_socket_name() -> str:
    return f"wait-{os.urandom(8).hex()}.sock"


def reply_socket_path(data_dir: str, name: str) -> str | None:
    """The reply socket's path for a name a CLI sent, or None for anything else."""
    if (
        len(name) != _REPLY_NAME_LENGTH
        or not name.startswith("wait-")
        or not name.endswith(".sock")
        or any(c not in "0123456789abcdef" for c in name[5:-5])
    ):
        return None
    return os.path.join(data_dir, name)


def send_reply(path: str, message: dict[str, Any]) -> None:
    """One JSON datagram to a waiting CLI; never raises, never waits (it may be gone)."""
    import json

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(json.dumps(message).encode(), path)
    except OSError:
        pass
