"""What a pass decides from one job alone, and the pass's settings and summary.

Pure: no store, no server, no clock of its own (the time comes from the caller). Used by the
pass (push.py, pull.py) and by `sync --dry-run` (dryrun.py), which must decide exactly as the
pass does.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Any

from ..api import BackOff, RemoteError, ServerJob, Stop
from ..lifecycle import ERROR, PENDING, PENDING_DELETION
from ..model import Job, parse_rfc3339


@dataclasses.dataclass(frozen=True)
class Policy:
    max_retries: int = 5
    backoff_base_seconds: float = 15.0
    force_delete: bool = False
    # --reupload: synced jobs a complete listing lacks go back to pending, to be created again
    reupload: bool = False
    # audio larger than this goes up as a resumable upload when the server offers it; 0: never
    upload_chunk_bytes: int = 4 << 20


@dataclasses.dataclass
class PassSummary:
    ok: bool = True
    created: int = 0
    updated: int = 0
    deleted_remote: int = 0
    deleted_locally: int = 0
    pulled: int = 0
    reuploaded: int = 0
    errors: int = 0
    failed: int = 0
    skipped: str | None = None
    deletion_guard: bool = False
    handed_to_daemon: int | None = None
    # Not part of the printed summary:
    retry_after: float | None = dataclasses.field(default=None, repr=False)
    message: str | None = dataclasses.field(default=None, repr=False)
    again: bool = dataclasses.field(default=False, repr=False)
    message_logged: bool = dataclasses.field(default=False, repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "created": self.created,
            "updated": self.updated,
            "deleted_remote": self.deleted_remote,
            "deleted_locally": self.deleted_locally,
            "pulled": self.pulled,
            "reuploaded": self.reuploaded,
            "errors": self.errors,
            "failed": self.failed,
            "skipped": self.skipped,
            "deletion_guard": self.deletion_guard,
            "handed_to_daemon": self.handed_to_daemon,
        }


class StopPass(Exception):
    """The whole pass stops (6.1, 6.2): `skipped` says why, as its exit code's Stop."""

    def __init__(self, skipped: Stop, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.skipped = skipped
        self.retry_after = retry_after


def stop_for(exc: RemoteError) -> StopPass | None:
    """The errors that stop the whole pass (6.1, 6.2); None for per-job errors."""
    stop = Stop.for_error(exc)
    if stop is None:
        return None
    return StopPass(stop, str(exc), exc.retry_after if isinstance(exc, BackOff) else None)


def raise_if_stops(exc: RemoteError) -> None:
    """Raise the StopPass an error that stops the whole pass comes to; else return (the error
    is the job's, or the page's, alone)."""
    stop = stop_for(exc)
    if stop is not None:
        raise stop from None


def longest_backoff(policy: Policy) -> float:
    """The furthest a job's next attempt can legitimately be: base * 2^(max_retries-1) (6.9)."""
    return policy.backoff_base_seconds * float(1 << min(max(policy.max_retries - 1, 0), 30))


def changed_fields(job: Job) -> tuple[dict[str, Any], str | None]:
    """What a PATCH of `job` carries: the fields changed since the last sync (`metadata` whole),
    and the audio file to send when the audio changed (else None)."""
    base = job.base or {}
    fields: dict[str, Any] = {}
    if job.text != base.get("text"):
        fields["text"] = job.text
    if job.metadata != base.get("metadata"):
        fields["metadata"] = job.metadata
    send_audio = job.audio_file if job.audio_file and job.audio_file != job.audio_sent else None
    if job.audio_file is None and job.audio_sent is not None:
        fields["audio"] = None  # `update --no-audio`: the server removes its copy
    return fields, send_audio


def is_due(job: Job, now: _dt.datetime, max_wait: float | None = None) -> bool:
    """Whether a pass pushes `job` now. A next attempt further away than `max_wait` seconds was
    recorded under a clock that was ahead (or by hand): it counts as over at once (6.9), so a
    clock set back never strands a job."""
    status = job.sync_status
    if status == PENDING or (status == PENDING_DELETION and not job.next_attempt_at):
        return True
    if status in (ERROR, PENDING_DELETION):
        if not job.next_attempt_at:
            return True
        try:
            wait = (parse_rfc3339(job.next_attempt_at) - now).total_seconds()
        except (ValueError, OverflowError):
            return True
        return wait <= 0 or (max_wait is not None and wait > max_wait)
    return False


def differs(job: Job, sj: ServerJob) -> bool:
    """Whether the server's copy says something the local job does not."""
    return job.text != sj.text or job.metadata != sj.metadata or job.server_status != sj.status


def file_sha256(path: str | None) -> str | None:
    """The file's sha256, or None when there is no file or it cannot be read."""
    if not path:
        return None
    import hashlib  # 5 ms (OpenSSL): not for a `sync` that only hands over to a daemon

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


# A server that said no to a feature (the feed, batches, uploads) is asked again after a day.
FEATURE_PROBE_SECONDS = 24 * 3600


def worth_asking(pull_state: dict[str, Any], feature: str, now: float) -> bool:
    """Whether to use (or ask again for) a feature the server may offer: yes unless it said
    no within the last day; a "no" recorded in the future (a clock set back) is stale. `now`:
    the wall clock (time.time()), as the "no" was recorded."""
    state = pull_state.get(feature)
    if not isinstance(state, dict) or state.get("offered") is not False:
        return True
    checked = state.get("checked_at")
    return not isinstance(checked, (int, float)) or not now - FEATURE_PROBE_SECONDS < checked <= now
