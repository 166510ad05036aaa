"""What the sync pass knows of the server, without HTTP: the server's job object, the error
kinds (an exception class per kind, raised by the HTTP layer and sorted by the pass), and the
change feed's and batches' answers (contract sections 6 and 7).

The HTTP client (`remote.py`) turns answers into these; the pass (`sync.py`) consumes them.
Nothing here imports requests, so a command that only hands its pass to a daemon stays light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class RemoteError(Exception):
    """Base of the kinds below; str() never contains the token."""


class Offline(RemoteError):
    pass


class TLSFailure(RemoteError):
    pass


class AuthRefused(RemoteError):
    def __init__(self, status: int) -> None:
        super().__init__(f"the server refused the credentials (HTTP {status})")
        self.status = status


class BackOff(RemoteError):
    def __init__(self, status: int, retry_after: float) -> None:
        super().__init__(f"the server asked to back off for {retry_after:.0f} s (HTTP {status})")
        self.retry_after = retry_after


class Transient(RemoteError):
    pass


class Permanent(RemoteError):
    pass


class Gone(RemoteError):
    pass


class NotModified(RemoteError):
    """The listing has not changed since the ETag we sent (304)."""


@dataclass
class ServerJob:
    id: str
    local_id: str | None
    text: str
    metadata: dict[str, Any]
    status: str | None
    audio: dict[str, Any] | None
    created_at: str | None
    updated_at: str | None


@dataclass(frozen=True)
class InvalidJob:
    """A job object of a listing page that is not valid (contract 6.4): skipped, not applied.
    `id` is the job's id when it has a usable one."""

    id: str | None
    local_id: str | None
    reason: str


class InvalidJobObject(Transient):
    """An answer held a job object that is not valid; `server_id` is its id when usable."""

    def __init__(self, server_id: str | None, reason: str) -> None:
        named = f" {server_id!r}" if server_id is not None else ""
        super().__init__(f"the server answered an invalid job{named}: {reason}")
        self.server_id = server_id
        self.reason = reason




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


class NotAFeed(Transient):
    """A 200 on /changes that is not a page of changes (a server that answers every path)."""


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
