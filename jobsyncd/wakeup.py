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
