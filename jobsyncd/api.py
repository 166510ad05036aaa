"""What the sync pass knows of the server, without HTTP: the server's job object, the error
kinds (an exception class per kind, raised by the HTTP layer and sorted by the pass), and the
change feed's and batches' answers (contract sections 6 and 7).

The HTTP client (`remote.py`) turns answers into these; the pass (`sync/`) consumes them.
Nothing here imports requests, so a command that only hands its pass to a daemon stays light.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # for the annotation only: upload.py imports requests
    from .upload import Uploader


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


class AnswerTooLarge(Transient):
    """An answer that says (Content-Length) it is larger than the client accepts: a page of big
    jobs, so ask for fewer. One found too large while read (a flood) is a plain Transient."""


class Permanent(RemoteError):
    pass


class Gone(RemoteError):
    pass


class NotModified(RemoteError):
    """The listing has not changed since the ETag we sent (304)."""


class Stop(str, enum.Enum):
    """Why a pass stopped, or did not start (the summary's `skipped`, contract 2), and the
    exit code each gives: the one place that maps them."""

    OFFLINE = "offline"
    TLS = "tls"
    AUTH = "auth"
    BACKOFF = "backoff"

    def __str__(self) -> str:  # "offline" in messages, not "Stop.OFFLINE"
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def exit_code(self) -> int:
        return {Stop.OFFLINE: 75, Stop.BACKOFF: 75, Stop.AUTH: 77}.get(self, 1)

    @property
    def passes(self) -> bool:
        """A stop that ends by itself (the network is back, the window ends): try later."""
        return self in (Stop.OFFLINE, Stop.BACKOFF)

    @classmethod
    def for_error(cls, exc: RemoteError) -> Stop | None:
        """The errors that stop the whole pass (6.1, 6.2); None for per-job errors."""
        for kind, stop in ((Offline, cls.OFFLINE), (TLSFailure, cls.TLS), (AuthRefused, cls.AUTH)):
            if isinstance(exc, kind):
                return stop
        return cls.BACKOFF if isinstance(exc, BackOff) else None

    @classmethod
    def exit_code_of(cls, skipped: str | None) -> int:
        """The exit code of a pass that is not ok and was `skipped` (None: jobs failed)."""
        try:
            return cls(skipped).exit_code
        except ValueError:
            return 1


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


# Whether a feed's job object says exactly what the agent holds for its id (changes(held=)).
HeldTest = Callable[[dict[str, Any]], bool]


@dataclasses.dataclass(frozen=True)
class Unchanged:
    """A valid job object of the feed that says what the agent holds for it already (the
    `held` test of `changes`): nothing to apply, so it is not parsed into a ServerJob."""

    id: str


@dataclasses.dataclass(frozen=True)
class FeedPage:
    """One answer of the feed: its items (ServerJob, InvalidJob, Tombstone or Unchanged), the
    checkpoint to send next time, and whether more changes follow at once."""

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


class RemoteAPI(Protocol):
    """What the sync pass asks of a server (contract sections 6 and 7). `remote.Remote`
    implements it over HTTP; tests/support/memory_remote.py in memory, with the reference server's
    semantics, and one contract suite (tests/test_sync_contract.py) holds both to it.

    Every method raises the RemoteError kinds above for what went wrong; the feed and batches
    raise their "not offered" exceptions when the server has none. A job object that is not
    valid is an InvalidJob in a listing or feed page, an InvalidJobObject (a Transient) in the
    answer to a request of its own."""

    def create(
        self,
        local_id: str,
        text: str,
        metadata: dict[str, Any],
        audio_path: str | None,
        upload: tuple[str, str] | None = None,
    ) -> ServerJob:
        """POST a job; idempotent by local_id (a repeat answers the stored job, unchanged).
        `upload`: (id, filename) of a finished resumable upload to attach instead of a file."""
        ...

    def update(
        self,
        server_id: str,
        fields: dict[str, Any],
        audio_path: str | None,
        upload: tuple[str, str] | None = None,
    ) -> ServerJob:
        """PATCH the fields given (`"audio": None` removes the audio); Gone on 404."""
        ...

    def delete(self, server_id: str) -> None:
        """DELETE; a job the server does not have (404) counts as deleted."""
        ...

    def get(self, server_id: str) -> ServerJob:
        """GET one job; Gone on 404."""
        ...

    def list_pages(
        self, etag: str | None
    ) -> Iterator[tuple[list[ServerJob | InvalidJob], str | None]]:
        """The whole listing, page by page, each with the listing's ETag; NotModified when
        `etag` still matches."""
        ...

    def changes(
        self, since: str | None, limit: int, wait: float = 0, held: HeldTest | None = None
    ) -> FeedPage:
        """One page of the change feed after checkpoint `since` (None: from the beginning);
        FeedNotOffered, or FeedGone for a checkpoint the server cannot serve. A job object
        that `held` says the agent holds as it is comes as Unchanged when it is valid."""
        ...

    def batch(self, operations: list[tuple[str, bytes]]) -> list[Any]:
        """POST /batch: `operations` are (kind, the operation encoded as JSON); per operation a
        ServerJob, None (a delete done) or the RemoteError its own request would have raised;
        BatchNotOffered, BatchTooLarge. The same as batch_answers(ops, batch_results(ops))."""
        ...

    def batch_results(self, operations: list[tuple[str, bytes]]) -> list[Any]:
        """The request of batch(), raising as it does; its results not yet read as answers (so
        the pass can read them while the server works on the next batch)."""
        ...

    def batch_answers(self, operations: list[tuple[str, bytes]], results: list[Any]) -> Iterable[Any]:
        """The answer for each operation from its result; one left without a result is an
        error for its job."""
        ...

    def uploader(
        self, chunk_bytes: int, progress: Callable[[int, int], None] | None = None
    ) -> Uploader | None:
        """The tus client for this server's resumable uploads (contract 6.8), or None when this
        remote cannot carry them (the audio then goes with the create or update)."""
        ...

    def close(self) -> None: ...
