"""`jobsyncd sync --dry-run`: the actions a pass would take, found with GET requests only.

Nothing is written anywhere (no store line, no checkpoint, no back-off record, no last pass):
the push is planned from the store alone (which jobs are due, and which fields an update would
carry); the pull reads the listing and confirms absent jobs with a GET, as a pass would, and
applies the same matching rules (6.4) without applying anything.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import log
from .api import Stop
from .lifecycle import PENDING_DELETION, SYNCED, ErrorKind
from .model import Job, is_uuid, utc_now
from .sync.rules import (
    PassSummary,
    Policy,
    StopPass,
    changed_fields,
    differs,
    is_due,
    longest_backoff,
    raise_if_stops,
)


@dataclasses.dataclass(frozen=True)
class Action:
    action: str  # create, update, delete, pull, remove-local, reupload
    local_id: str | None
    server_id: str | None
    fields: tuple[str, ...] | None = None

    def public(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "local_id": self.local_id,
            "server_id": self.server_id,
            "fields": list(self.fields) if self.fields is not None else None,
        }

    def line(self) -> str:
        ids = self.local_id or "(new)"
        if self.server_id:
            ids += f" (server id {self.server_id})"
        fields = f": {', '.join(self.fields)}" if self.fields else ""
        return f"{self.action} {ids}{fields}"


def plan_push(jobs: dict[str, Job], policy: Policy, now: _dt.datetime) -> Iterator[Action]:
    max_wait = longest_backoff(policy)
    due = sorted(
        (j for j in jobs.values() if is_due(j, now, max_wait)),
        key=lambda j: (j.created_at, j.local_id),
    )
    for job in due:
        if job.sync_status == PENDING_DELETION:
            yield Action("delete", job.local_id, job.server_id)
        elif job.server_id is None or job.error_kind == ErrorKind.UNCONFIRMED:
            yield Action("create", job.local_id, job.server_id)
        else:
            fields, audio = changed_fields(job)
            names = sorted(fields) + (["audio"] if audio else [])
            yield Action("update", job.local_id, job.server_id, tuple(names))


def plan_pull(  # noqa: C901 - the pull's decision table, kept in the pass's order
    jobs: dict[str, Job], remote: Any, policy: Policy, etag: str | None, summary: PassSummary
) -> Iterator[Action]:
    """The pull's actions; sets summary.ok / deletion_guard / message like a pass would."""
    from .api import NotModified, RemoteError, ServerJob

    by_server_id = {j.server_id: j.local_id for j in jobs.values() if j.server_id is not None}
    synced = {j.server_id: j.local_id for j in jobs.values() if j.sync_status == SYNCED and j.server_id}
    unlisted = dict(synced)
    seen_new: set[str] = set()
    complete = True
    try:
        for page, _etag in remote.list_pages(etag):
            for sj in page:
                if not isinstance(sj, ServerJob):
                    complete = False  # an invalid job object: nothing is removed
                    summary.ok = False
                    continue
                unlisted.pop(sj.id, None)
                mine = jobs.get(sj.local_id.lower()) if sj.local_id else None
                if mine is not None and mine.server_id not in (None, sj.id):
                    unlisted.pop(mine.server_id, None)
                    yield Action("pull", mine.local_id, sj.id, ("server_id",))
                    continue
                if mine is not None and mine.server_id is None:
                    continue
                local_id = by_server_id.get(sj.id)
                if local_id is not None:
                    cur = jobs[local_id]
                    if cur.sync_status == SYNCED and differs(cur, sj):
                        yield Action("pull", local_id, sj.id, _pulled_fields(cur, sj))
                    continue
                if sj.id not in seen_new:
                    seen_new.add(sj.id)
                    wanted = sj.local_id.lower() if sj.local_id else None
                    keep = wanted if wanted and is_uuid(wanted) and wanted not in jobs else None
                    yield Action("pull", keep, sj.id, None)
    except NotModified:
        return
    except RemoteError as exc:
        raise_if_stops(exc)
        summary.ok = False
        summary.message = f"the server listing failed part-way: {exc}"
        return
    if not complete or not unlisted:
        return
    if policy.reupload:
        for server_id, local_id in unlisted.items():
            yield Action("reupload", local_id, server_id)
        return
    if len(synced) >= 2 and len(unlisted) == len(synced) and not policy.force_delete:
        summary.ok = False
        summary.deletion_guard = True
        summary.message = (
            f"the server listing holds none of the {len(synced)} synced jobs; a pass would remove "
            "nothing (deletion guard)"
        )
        return
    for server_id, local_id in unlisted.items():
        try:
            sj = remote.get(server_id)
        except RemoteError as exc:
            raise_if_stops(exc)
            from .api import Gone

            if isinstance(exc, Gone):
                yield Action("remove-local", local_id, server_id)
            else:
                summary.ok = False
            continue
        if differs(jobs[local_id], sj):
            yield Action("pull", local_id, server_id, _pulled_fields(jobs[local_id], sj))


def _pulled_fields(job: Job, sj: Any) -> tuple[str, ...]:
    names = []
    if job.text != sj.text:
        names.append("text")
    if job.metadata != sj.metadata:
        names.append("metadata")
    if job.server_status != sj.status:
        names.append("server_status")
    return tuple(names)


def dry_run(
    jobs: dict[str, Job],
    remote: Any,
    policy: Policy,
    etag: str | None,
    emit: Callable[[Action], None],
    now: Callable[[], _dt.datetime] = utc_now,
) -> PassSummary:
    """Emit each planned action; return a summary whose ok/skipped/message say how a pass would
    end (its counts stay 0: nothing was done)."""
    summary = PassSummary()
    for action in plan_push(jobs, policy, now()):
        emit(action)
    try:
        for action in plan_pull(jobs, remote, policy, etag, summary):
            emit(action)
    except StopPass as stop:
        summary.ok = False
        summary.skipped = stop.skipped
        summary.message = str(stop)
    return summary


def run_dry_run_command(
    settings: Any, store: Any, as_json: bool, force_delete: bool, reupload: bool
) -> int:
    """`sync --dry-run`: never handed to a daemon; inside a back-off window exits 75 at once."""
    from .config import check_server_url, read_token
    from .runner import exit_code_for, rfc3339_epoch
    from .state import read_backoff_until, read_pull_state

    api_base = check_server_url(settings)
    token, warnings = read_token(settings)
    for message in warnings:
        log.warning(message)
    until = read_backoff_until(settings.data_dir)
    if until is not None and until > time.time():
        log.error(
            f"the server asked to back off; no request before {rfc3339_epoch(until)} (try again "
            "later)"
        )
        return Stop.BACKOFF.exit_code
    from .runner import make_remote

    remote = make_remote(settings, token)
    pull_state = read_pull_state(settings.data_dir)
    etag = pull_state.get("etag") if pull_state.get("server") == api_base else None
    policy = Policy(
        settings.max_retries, settings.backoff_base_seconds, force_delete, reupload=reupload
    )

    def emit(action: Action) -> None:
        print(json.dumps(action.public()) if as_json else action.line(), flush=True)

    try:
        summary = dry_run(store.refresh(), remote, policy, etag, emit)
    finally:
        remote.close()
    if summary.message:
        log.error(summary.message)
    return exit_code_for(summary)
