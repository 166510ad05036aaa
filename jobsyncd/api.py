"""What the sync pass knows of the server's change feed (contract 6.7, section 7), without HTTP.

The HTTP client (`remote.py`) turns answers of `GET /api/v1/changes` into these; the pass
(`sync.py`) consumes them. Nothing here imports requests.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Tombstone:
    """A job deleted on the server: `{"id", "local_id", "deleted": true}` in the feed."""

    id: str
    local_id: str | None


@dataclasses.dataclass(frozen=True)
class FeedPage:
    """One answer of the feed: its items (ServerJob, InvalidJob or Tombstone), the checkpoint to
    send next time, and whether more changes follow at once."""

    items: list[Any]
    next: str
    more: bool


class FeedNotOffered(Exception):
    """404 or 405 on /changes: the server has no change feed; listing mode is used."""


class FeedGone(Exception):
    """410 on /changes: the checkpoint cannot be served. `reason` is "expired" (older than the
    server's retained tombstones) or "diverged" (another history: a restore, or another server);
    an unknown reason is taken as "diverged", the safe reading (nothing is removed)."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or f"the change feed answered 410 ({reason})")
        self.reason = reason if reason in ("expired", "diverged") else "diverged"


class BatchNotOffered(Exception):
    """404 or 405 on POST /batch: the server has no batch endpoint; requests go one by one."""


class BatchTooLarge(Exception):
    """413 on POST /batch: the server wants smaller batches."""
