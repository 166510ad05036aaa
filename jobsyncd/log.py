"""One-line messages on stderr: `jobsyncd: error:` / `jobsyncd: warning:` and the daemon's log.

Plain prints rather than the logging module, which costs start-up time on every local command.
Under systemd (`JOURNAL_STREAM` set) lines carry `<N>` priority prefixes and no timestamps; a
daemon elsewhere gets a timestamp; `-q` keeps only errors. Nothing here ever prints a token.
"""

from __future__ import annotations

import os
import sys
import time

ERROR, WARNING, INFO, DEBUG = 3, 4, 6, 7  # syslog priorities, as journald reads them
_LABEL = {ERROR: "error: ", WARNING: "warning: ", INFO: "", DEBUG: "debug: "}

level = WARNING
per_job = False  # -v: one line per job a pass touches, in the daemon's log too
timestamps = False
journal = False


def configure(verbose: int = 0, quiet: bool = False, daemon: bool = False) -> None:
    # The log's settings are process-wide by design: one CLI run or one daemon per process.
    global level, timestamps, journal, per_job  # noqa: PLW0603
    per_job = verbose >= 1 and not quiet
    level = ERROR if quiet else {0: WARNING, 1: INFO}.get(verbose, DEBUG)
    if daemon and not quiet:
        level = max(level, INFO)  # the daemon logs one line per start, stop, reload and pass
    journal = daemon and bool(os.environ.get("JOURNAL_STREAM"))
    timestamps = daemon and not journal


def emit(priority: int, message: str) -> None:
    if priority > level:
        return
    line = f"jobsyncd: {_LABEL[priority]}{message}"
    if journal:
        line = f"<{priority}>{line}"
    elif timestamps:
        line = time.strftime("%Y-%m-%dT%H:%M:%S%z ") + line
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def error(message: str) -> None:
    emit(ERROR, message)


def warning(message: str) -> None:
    emit(WARNING, message)


def info(message: str) -> None:
    emit(INFO, message)


def debug(message: str) -> None:
    emit(DEBUG, message)


def job_line(action: str, local_id: str, detail: str = "") -> None:
    """`-v`: one line per job a pass pushes, pulls or removes (contract section 2)."""
    if per_job:
        emit(INFO, f"{action} {local_id}{': ' + detail if detail else ''}")
