"""Small state files in the data dir: the last pass's record, the server's back-off window, the ETag.

Each is written whole to a temporary file and renamed (never through a symlink), so a reader
sees the old content or the new, and every process (daemon or one-shot) honours the same window.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .fsutil import write_file_atomically

LAST_PASS_NAME = "last_pass.json"
BACKOFF_NAME = "backoff.json"
PULL_STATE_NAME = "pull_state.json"
BACKOFF_MAX_AHEAD = 3600.0  # the longest Retry-After honoured (contract 5)


def _read_json(data_dir: str, name: str) -> Any:
    path = os.path.join(data_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            return json.loads(fh.read(1 << 20))
    except (OSError, ValueError):
        return None


def _write_json(data_dir: str, name: str, value: Any, durable: bool = False) -> None:
    write_file_atomically(
        data_dir, name, json.dumps(value, separators=(",", ":")).encode(), durable
    )


def read_last_pass(data_dir: str) -> dict[str, Any] | None:
    value = _read_json(data_dir, LAST_PASS_NAME)
    return value if isinstance(value, dict) else None


def write_last_pass(data_dir: str, record: dict[str, Any]) -> None:
    _write_json(data_dir, LAST_PASS_NAME, record)


def read_backoff_until(data_dir: str, now: float | None = None) -> float | None:
    """Wall-clock time (epoch seconds) before which no request may be made, or None.

    A window ending more than BACKOFF_MAX_AHEAD seconds after `now` (time.time() by default)
    cannot come from a Retry-After (clamped to 1 h): it was recorded while the clock was ahead,
    and counts as over at once (contract 6.9), so a clock set back never stops syncing.
    """
    value = _read_json(data_dir, BACKOFF_NAME)
    if not isinstance(value, dict) or not isinstance(value.get("until"), (int, float)):
        return None
    until = float(value["until"])
    now = time.time() if now is None else now
    if not until <= now + BACKOFF_MAX_AHEAD:  # also NaN
        return None
    return until


def write_backoff_until(data_dir: str, until: float) -> None:
    _write_json(data_dir, BACKOFF_NAME, {"until": until}, durable=True)


def read_pull_state(data_dir: str) -> dict[str, Any]:
    value = _read_json(data_dir, PULL_STATE_NAME)
    return value if isinstance(value, dict) else {}


def write_pull_state(data_dir: str, value: dict[str, Any]) -> None:
    _write_json(data_dir, PULL_STATE_NAME, value, durable=True)
