"""systemd's notify protocol (sd_notify(3), sd_watchdog_enabled(3)) without libsystemd.

Owns the datagrams sent to ``$NOTIFY_SOCKET`` and the watchdog period read from
``$WATCHDOG_USEC``/``$WATCHDOG_PID``. Outside systemd every method is a silent no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

# systemd reads each notification into a buffer of PIPE_BUF bytes (NOTIFY_BUFFER_MAX in
# src/core/manager.c) and drops a longer datagram whole, so a long STATUS= is cut to fit.
MAX_DATAGRAM_BYTES = 4096

# sendto() on a datagram socket blocks while the receiver's queue is full; the daemon must
# still stop within 5 s, so a notification that cannot leave within this time is dropped.
SEND_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class Notifier:
    """Sends state changes to the service manager; a no-op when ``address`` is None.

    ``address`` is the socket address as given to sendto(): a filesystem path, or a
    Linux abstract-namespace name starting with a NUL byte.
    """

    address: str | None = None
    watchdog_usec: str | None = None
    watchdog_pid: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build the notifier systemd asked for in ``environ`` (``os.environ`` by default)."""
        return cls(
            address=_socket_address(environ.get("NOTIFY_SOCKET", "")),
            watchdog_usec=environ.get("WATCHDOG_USEC"),
            watchdog_pid=environ.get("WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self) -> bool:
        """Start-up (or a reload) is complete: ``READY=1``."""
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``: ``STATUS=<text>``."""
        # A newline would start a new assignment that systemd acts on; a NUL byte makes
        # systemd drop the whole datagram.
        one_line = " ".join(text.replace("\0", " ").splitlines())
        return self.send(_truncated("STATUS=" + one_line))

    def reloading(self) -> bool:
        """A reload begins; systemd wants the monotonic time of the message with it."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> bool:
        """Shutdown begins: ``STOPPING=1``."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``: ``WATCHDOG=1``."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None for no pings.

        None when there is no notify socket to ping, when ``WATCHDOG_USEC`` is unset or not a
        positive integer, or when ``WATCHDOG_PID`` is set and is not this process (the
        variables were inherited from a parent that systemd watches), as sd_watchdog_enabled(3).
        """
        if not self.enabled or self.watchdog_usec is None:
            return None
        usec = _decimal(self.watchdog_usec)
        if not usec:
            log.debug("ignoring WATCHDOG_USEC=%r: not a positive integer", self.watchdog_usec)
            return None
        if self.watchdog_pid is not None and _decimal(self.watchdog_pid) != os.getpid():
            return None
        return usec / 2 / 1_000_000

    def send(self, message: str) -> bool:
        """Send one datagram of newline-separated assignments; True when it left.

        Never raises: a service manager that went away must not take the daemon with it.
        """
        if self.address is None:
            return False
        try:
            # A fresh socket per message, as libsystemd does: nothing to keep open or to
            # share between the main loop and a watchdog thread.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT_SECONDS)
                sock.sendto(message.encode("utf-8"), self.address)
        except (OSError, ValueError) as exc:
            log.debug("could not notify the service manager (%r): %s", message, exc)
            return False
        return True


def _socket_address(value: str) -> str | None:
    """NOTIFY_SOCKET as a sendto() address, or None when unset or unusable."""
    if not value:
        return None
    # libsystemd accepts only an absolute path or an "@" abstract name (newer systemd adds
    # vsock:, which no Linux version jobsyncd targets hands to a service).
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/") and len(value) > 1:
        return value
    log.debug("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an @name", value)
    return None


def _decimal(value: str) -> int | None:
    """A plain decimal number, or None: int() would also take " 6", "+6" and "6_0"."""
    return int(value) if value.isascii() and value.isdigit() else None


def _truncated(message: str) -> str:
    """``message`` cut to MAX_DATAGRAM_BYTES of UTF-8 without splitting a character."""
    data = message.encode("utf-8")
    if len(data) <= MAX_DATAGRAM_BYTES:
        return message
    return data[:MAX_DATAGRAM_BYTES].decode("utf-8", errors="ignore")
