"""The job record, its sync statuses and pure helpers (no I/O).

A `Job` is what the user sees (the keys of contract section 1) plus the bookkeeping the store and
the sync pass need (`rev`, `base`, `create_sent`), which never reaches `--json` output.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import random
import uuid
from enum import Enum
from typing import Any


class SyncStatus(str, Enum):
    PENDING = "pending"
    SYNCED = "synced"
    PENDING_DELETION = "pending_deletion"
    ERROR = "error"
    FAILED = "failed"


STATUSES = tuple(s.value for s in SyncStatus)

# The keys of a job object in `--json` output, in the contract's order (section 1).
PUBLIC_KEYS = (
    "local_id",
    "server_id",
    "text",
    "audio_file",
    "metadata",
    "server_status",
    "sync_status",
    "retry_count",
    "last_sync_attempt_at",
    "last_error",
    "created_at",
    "updated_at",
)


@dataclasses.dataclass(slots=True)
class Job:
    local_id: str
    server_id: str | None = None
    text: str = ""
    audio_file: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    server_status: str | None = None
    sync_status: str = SyncStatus.PENDING.value
    retry_count: int = 0
    last_sync_attempt_at: str | None = None
    last_error: str | None = None
    created_at: str = ""
    updated_at: str = ""
    # Bookkeeping, never shown to users:
    # rev counts local (user) changes; the pass compares it to detect edits made during a push.
    rev: int = 0
    # base: what the server held after the last sync ({"text", "metadata", "audio"}), so that a
    # PATCH carries only the fields changed since; None before the first sync.
    base: dict[str, Any] | None = None
    # create_sent: a POST may have reached the server, so a delete must find the server copy.
    create_sent: bool = False
    # audio_sent: the managed audio file that the server has (path), to know when audio changed.
    audio_sent: str | None = None
    # error_kind: "delete" when a failed/errored job was a deletion ("retry" puts it back there).
    error_kind: str | None = None
    # next_attempt_at: when a job in `error` is due again (backoff with jitter, fixed at failure).
    next_attempt_at: str | None = None

    def public(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PUBLIC_KEYS}

    def record(self) -> dict[str, Any]:
        """The store's line for this job (all fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Job:
        known = _FIELD_NAMES
        return cls(**{k: v for k, v in rec.items() if k in known})

    def copy(self) -> Job:
        j = dataclasses.replace(self)
        j.metadata = json.loads(json.dumps(self.metadata))
        if self.base is not None:
            j.base = json.loads(json.dumps(self.base))
        return j


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Job))


def new_local_id() -> str:
    return str(uuid.uuid4())


def is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def rfc3339(moment: _dt.datetime) -> str:
    """RFC 3339 UTC with a `Z`, millisecond precision: 2026-11-23T18:02:29.123Z."""
    moment = moment.astimezone(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> _dt.datetime:
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    return _dt.datetime.fromisoformat(text)


def parse_meta_value(raw: str) -> Any:
    """`--meta KEY=VALUE`: VALUE as JSON when it parses, else the string itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_meta(pair: str) -> tuple[str, Any]:
    """Split at the first `=`; raises ValueError on a pair without one or with an empty key."""
    key, sep, raw = pair.partition("=")
    if not sep:
        raise ValueError(f"--meta {pair!r} is not KEY=VALUE")
    if not key:
        raise ValueError(f"--meta {pair!r} has an empty KEY")
    return key, parse_meta_value(raw)


def backoff_delay(base_seconds: float, retry_count: int, rng: random.Random | None = None) -> float:
    """Seconds until a job in `error` is due again: between half and all of base * 2^(n-1).

    "Equal jitter" (AWS Architecture Blog, "Exponential Backoff and Jitter"): never sooner than half
    the nominal delay, so a burst of failures spreads out without retrying at once.
    """
    if base_seconds <= 0 or retry_count <= 0:
        return 0.0
    nominal = base_seconds * (2 ** min(retry_count - 1, 30))
    r = (rng or random).random()
    return nominal / 2 + r * nominal / 2
