"""Local job operations: create, update, delete, retry, and the status report.

Each takes the store lock for its read-modify-append, so two CLI commands never lose each
other's change, and bumps `rev` so a sync pass in flight notices the job changed under it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import audio, lifecycle
from .errors import JobsyncdError, UsageProblem
from .lifecycle import ERROR, FAILED, PENDING, PENDING_DELETION
from .model import Job, SyncStatus, new_local_id, parse_rfc3339, rfc3339, utc_now
from .store import Store


def create_job(
    store: Store, text: str | None, audio_src: str | None, metadata: dict[str, Any]
) -> Job:
    src_fd = audio.open_user_audio(audio_src) if audio_src else None
    local_id = new_local_id()
    copy = None
    try:
        if src_fd is not None:
            copy = audio.import_copy(store.data_dir, src_fd, audio_src or "", local_id)
    finally:
        if src_fd is not None:
            os.close(src_fd)
    now = rfc3339(utc_now())
    job = Job(
        local_id=local_id,
        text=text or "",
        audio_file=copy,
        metadata=metadata,
        created_at=now,
        updated_at=now,
        rev=1,
    )
    try:
        store.append([job])
    except BaseException:
        audio.remove_managed(store.data_dir, copy)
        raise
    return job


def _same_content(a: str, b: str) -> bool:
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                ca, cb = fa.read(1 << 20), fb.read(1 << 20)
                if ca != cb:
                    return False
                if not ca:
                    return True
    except OSError:
        return False


def _check_updatable(job: Job, ref: str, copy: str | None, edited_from: str | None) -> None:
    """Raise when the update must not go ahead: the reference moved to another job while the
    audio was copied, the job is being deleted, or its text changed under the editor."""
    if copy is not None and not os.path.basename(copy).startswith(job.local_id):
        raise JobsyncdError(f"{ref!r} changed meaning during the update; try again")
    lifecycle.check_editable(job)
    if edited_from is not None and job.text != edited_from:
        raise JobsyncdError(
            f"job {job.local_id}'s text changed while you edited it; nothing changed"
        )


def update_job(
    store: Store,
    ref: str,
    text: str | None,
    audio_src: str | None,
    set_meta: dict[str, Any],
    unset_meta: list[str],
    remove_audio: bool = False,
    edited_from: str | None = None,
) -> tuple[Job, bool]:
    """Apply the changes; returns the job and whether anything changed.

    `remove_audio` drops the job's audio (`--no-audio`): its audio_file becomes None while
    audio_sent still names what the server has, which is how the push knows to send
    `"audio": null`. `edited_from` is the text an editor started from: if the job's text
    changed meanwhile, nothing changes (the edit would silently undo the other change)."""
    src_fd = audio.open_user_audio(audio_src) if audio_src else None
    copy = None
    committed = False
    try:
        if src_fd is not None:
            # Copied before the store lock is taken: a large file must not hold up the daemon
            # or other commands. Dropped again below if the update does not go ahead.
            first = store.find(ref)
            if not (first.audio_file and _same_content(first.audio_file, audio_src or "")):
                copy = audio.import_copy(store.data_dir, src_fd, audio_src or "", first.local_id)
        with store.locked():
            job = store.find(ref)
            _check_updatable(job, ref, copy, edited_from)
            metadata = json.loads(json.dumps(job.metadata))
            metadata.update(set_meta)
            for key in unset_meta:
                metadata.pop(key, None)
            new_text = job.text if text is None else text
            drop_audio = remove_audio and job.audio_file is not None
            if (
                new_text == job.text
                and metadata == job.metadata
                and copy is None
                and not drop_audio
            ):
                return job, False
            old_audio = job.audio_file
            job = lifecycle.edited(
                job,
                rfc3339(utc_now()),
                text=new_text,
                metadata=metadata,
                audio_file=copy if copy is not None else None if drop_audio else old_audio,
            )
            store.append([job])
            committed = True
            # The old copy goes once the new one is in place (or the audio is dropped): a
            # PATCH only ever sends the current file.
            if (copy is not None or drop_audio) and old_audio:
                problem = audio.remove_managed(store.data_dir, old_audio)
                if problem:
                    from . import log

                    log.warning(problem)
            return job, True
    finally:
        if copy is not None and not committed:
            audio.remove_managed(store.data_dir, copy)
        if src_fd is not None:
            os.close(src_fd)


def _resolve_all(store: Store, refs: list[str]) -> list[Job]:
    """Every JOB resolved (each once) before anything changes: one that does not resolve
    raises and nothing is written."""
    jobs: dict[str, Job] = {}
    for ref in refs:
        job = store.find(ref)
        jobs.setdefault(job.local_id, job)
    return list(jobs.values())


def delete_jobs(store: Store, refs: list[str]) -> list[Job]:
    with store.locked():
        jobs = _resolve_all(store, refs)
        now = rfc3339(utc_now())
        marked = [lifecycle.marked_for_deletion(job, now) for job in jobs]
        store.append([new for new, old in zip(marked, jobs, strict=True) if new is not old])
        return marked


def delete_job(store: Store, ref: str) -> Job:
    return delete_jobs(store, [ref])[0]


def retry_jobs(store: Store, refs: list[str]) -> list[Job]:
    with store.locked():
        # Every job is checked before anything is written: one that is not failed refuses all.
        jobs = [lifecycle.retried(job) for job in _resolve_all(store, refs)]
        store.append(jobs)
        return jobs


def retry_job(store: Store, ref: str) -> Job:
    return retry_jobs(store, [ref])[0]


def retry_all(store: Store) -> int:
    with store.locked():
        jobs = [lifecycle.retried(j) for j in store.load().values() if j.sync_status == FAILED]
        store.append(jobs)
        return len(jobs)


def status_report(
    store: Store, server_url: str | None, last_pass: dict[str, Any] | None, daemon_pid: int | None
) -> dict[str, Any]:
    jobs = store.load()
    counts = {s.value: 0 for s in SyncStatus}
    oldest = None
    uploads = []
    for job in jobs.values():
        counts[job.sync_status] += 1
        if job.upload_url is not None:
            uploads.append({"local_id": job.local_id, "offset": job.upload_offset})
        if job.sync_status in (PENDING, PENDING_DELETION, ERROR) and (
            oldest is None or job.updated_at < oldest
        ):
            oldest = job.updated_at
    age = None
    if oldest:
        age = max(0.0, round((utc_now() - parse_rfc3339(oldest)).total_seconds(), 3))
    return {
        "total": len(jobs),
        "counts": counts,
        "oldest_pending_age_seconds": age,
        "daemon": {"running": bool(daemon_pid is not None), "pid": daemon_pid or None},
        "last_pass": last_pass,
        "server_url": server_url,
        "data_dir": store.data_dir,
        # resumable uploads under way: the offset the server last confirmed (contract 6.8)
        "uploads_in_progress": uploads,
    }


def feed_report(pull_state: dict[str, Any], now: float) -> dict[str, Any]:
    """`status --json`'s `feed`: how the pull reads the server ("feed", "listing", or
    "unknown" before the first pass) and how old the stored checkpoint is."""
    feed = pull_state.get("feed")
    offered = feed.get("offered") if isinstance(feed, dict) else None
    mode = "feed" if offered is True else "listing" if offered is False else "unknown"
    stored = pull_state.get("checkpoint_at")
    age = None
    if mode == "feed" and isinstance(stored, (int, float)):
        age = max(0.0, round(now - stored, 3))
    return {"mode": mode, "checkpoint_age_seconds": age}


MAX_META_DEPTH = 32  # the metadata object itself is level 1, as on the server
_DOUBLE_MAX = 1.7976931348623157e308


def _meta_int(text: str) -> int:
    # Checked on the digits first: Python refuses to convert over 4300 of them, and a number
    # that long is outside the double range anyway.
    if len(text.lstrip("-")) > 309 or abs(int(text)) > _DOUBLE_MAX:
        raise UsageProblem(f"--meta: the number {text[:20]}… is outside the double range")
    return int(text)


def _meta_float(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # 1e400 reads as infinity
        raise UsageProblem(f"--meta: the number {text[:40]} is outside the double range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity are not JSON: the value is taken as a string


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar 0, `{}` or `[]` 1), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            todo.extend((child, level + 1) for child in item)
    return deepest


def parse_meta_args(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`--meta KEY=VALUE`s (contract section 2): split at the first `=`, VALUE as JSON when it
    parses, else the string. A number outside the double range, or nesting that would take the
    metadata past 32 levels, is a usage error."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise UsageProblem(f"--meta {pair!r} is not KEY=VALUE")
        if not key:
            raise UsageProblem(f"--meta {pair!r} has an empty KEY")
        try:
            value = json.loads(
                raw,
                parse_int=_meta_int,
                parse_float=_meta_float,
                parse_constant=_reject_constant,
            )
        except RecursionError:
            value = None
            too_deep = True
        except ValueError:
            value, too_deep = raw, False
        else:
            too_deep = 1 + _depth(value) > MAX_META_DEPTH
        if too_deep:
            raise UsageProblem(
                f"--meta {key}: the value nests too deep (metadata holds at most "
                f"{MAX_META_DEPTH} levels)"
            )
        out[key] = value
    return out


def check_meta_not_conflicting(set_meta: dict[str, Any], unset_meta: list[str]) -> None:
    both = sorted(set(set_meta) & set(unset_meta))
    if both:
        raise UsageProblem(f"--meta and --unset-meta both name {', '.join(both)}")
