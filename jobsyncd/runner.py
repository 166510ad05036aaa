"""Running a pass for real: settings -> Remote, the sync lock, the back-off window, the records.

Both `jobsyncd sync` and the daemon call `execute_pass`; `run_sync_command` adds the one-shot's
hand-over to a running daemon, its output and its exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import log
from .api import Stop
from .config import Settings, check_server_url, read_token
from .errors import JobsyncdError
from .fsutil import FileLock
from .model import rfc3339, utc_now
from .state import (
    read_backoff_until,
    read_pull_state,
    write_backoff_until,
    write_last_pass,
    write_pull_state,
)
from .store import Store
from .sync import PassSummary, Policy

if TYPE_CHECKING:  # for the annotation only: importing it loads requests
    from .remote import Remote

SYNC_LOCK_NAME = "sync.lock"
PROGRESS_MIN_JOBS = 50


class Progress(Protocol):
    """Where a pass reports how many jobs it has pushed so far; closed when the pass ends."""

    def __call__(self, done: int) -> None: ...

    def close(self) -> None: ...


def exit_code_for(summary: PassSummary) -> int:
    return 0 if summary.ok else Stop.exit_code_of(summary.skipped)


def sync_lock(data_dir: str) -> FileLock:
    return FileLock(os.path.join(data_dir, SYNC_LOCK_NAME), timeout=24 * 3600, what="the sync pass")


def execute_pass(
    settings: Settings,
    store: Store,
    token: str | None,
    force_delete: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    progress_factory: Callable[[Store], Progress | None] | None = None,
    reupload: bool = False,
) -> PassSummary:
    """One pass under the sync lock, honouring and recording the back-off window.

    The caller holds the sync lock. Raises ConfigError for a bad server URL.
    """
    until = read_backoff_until(settings.data_dir)
    backing_off = until is not None and until > time.time()
    if not backing_off:
        from .sync import prepare_pass

        check_server_url(settings, http_layer=False)  # a bad URL stops before the store is read
        prepare_pass(store)  # the store's bytes read while the HTTP layer below loads
    try:
        api_base = check_server_url(settings)
        started = utc_now()
        if until is not None and backing_off:
            summary = PassSummary(ok=False, skipped=Stop.BACKOFF, retry_after=until - time.time())
            summary.message = (
                f"the server asked to back off; no request before {rfc3339_epoch(until)}"
            )
        else:
            summary = _pass_against(
                settings,
                store,
                token,
                api_base,
                force_delete,
                should_stop,
                progress_factory,
                reupload,
            )
    finally:
        store.drop_prefetch()  # read for a fold that did not happen
    record = {"started_at": rfc3339(started), "finished_at": rfc3339(utc_now()), **summary.public()}
    try:
        write_last_pass(settings.data_dir, record)
    except Exception as exc:  # the record is informative: it never fails a pass
        log.warning(f"cannot record the last pass: {exc}")
    return summary


def _pass_against(
    settings: Settings,
    store: Store,
    token: str | None,
    api_base: str,
    force_delete: bool,
    should_stop: Callable[[], bool],
    progress_factory: Callable[[Store], Progress | None] | None,
    reupload: bool,
) -> PassSummary:
    """execute_pass() outside a back-off window: the pass, then what it learnt of the server."""
    from .sync import run_pass

    remote = make_remote(settings, token)
    pull_state = read_pull_state(settings.data_dir)
    if pull_state.get("server") != api_base:
        pull_state = {"server": api_base}
    before = dict(pull_state)
    policy = Policy(
        settings.max_retries,
        settings.backoff_base_seconds,
        force_delete,
        reupload=reupload,
        upload_chunk_bytes=settings.upload_chunk_bytes,
    )
    progress = progress_factory(store) if progress_factory else None
    # On a terminal, resumable uploads show a bar in bytes (one per upload).
    upload_bar = _ByteProgress() if progress_factory else None
    try:
        summary = run_pass(
            store,
            remote,
            policy,
            should_stop=should_stop,
            progress=progress,
            pull_state=pull_state,
            upload_progress=upload_bar,
        )
    finally:
        remote.close()
        if progress is not None:
            progress.close()
        if upload_bar is not None:
            upload_bar.close()
    try:
        if summary.retry_after is not None:
            write_backoff_until(settings.data_dir, time.time() + summary.retry_after)
        if pull_state != before:
            write_pull_state(settings.data_dir, pull_state)
    except JobsyncdError as exc:
        # The pass itself is recorded in the store; these files only save requests.
        log.warning(str(exc))
    return summary


def make_remote(settings: Settings, token: str | None) -> Remote:
    """The HTTP client for the configured server (requests is imported only here)."""
    from .remote import Remote  # costs start-up time: only when a pass or a poll really runs

    return Remote(
        check_server_url(settings),
        token=token,
        timeout=settings.request_timeout_seconds,
        verify_tls=settings.verify_tls,
        ca_bundle=settings.ca_bundle,
    )


def rfc3339_epoch(epoch: float) -> str:
    import datetime as _dt

    return rfc3339(_dt.datetime.fromtimestamp(epoch, _dt.timezone.utc))


class _Progress:
    """Click's progress bar on stderr, for passes with more than a few dozen jobs to push."""

    def __init__(self, total: int) -> None:
        import click

        self.bar = click.progressbar(length=total, label="pushing", file=sys.stderr)
        self.bar.__enter__()
        self.done = 0

    def __call__(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        self.bar.__exit__(None, None, None)


class _ByteProgress:
    """Click's progress bar in bytes on stderr for each resumable upload of a pass."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None or done < self.done:
            self.close()
            import click

            self.bar = click.progressbar(length=total, label="uploading", file=sys.stderr)
            self.bar.__enter__()
            self.done = 0
        self.bar.update(done - self.done)
        self.done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _progress_factory(store: Store) -> _Progress | None:
    from .sync import count_due

    total = count_due(store)
    return _Progress(total) if total > PROGRESS_MIN_JOBS else None


def describe(summary: PassSummary) -> str:
    parts = [
        f"{summary.created} created",
        f"{summary.updated} updated",
        f"{summary.deleted_remote} deleted on the server",
        f"{summary.deleted_locally} removed here",
        f"{summary.pulled} pulled",
        *([f"{summary.reuploaded} to upload again"] if summary.reuploaded else []),
        f"{summary.errors} errors",
        f"{summary.failed} failed",
    ]
    head = (
        "pass ok"
        if summary.ok
        else f"pass skipped ({summary.skipped})"
        if summary.skipped
        else "pass not ok"
    )
    if summary.deletion_guard:
        head += " (deletion guard)"
    return f"{head}: " + ", ".join(parts)


IDLE_SUMMARY_SECONDS = 3600.0


class PassLog:
    """What the daemon logs about its passes (contract section 5): a pass that changed
    something or failed, always; offline and back-off when they begin and when they end, not
    at every pass; a pass with nothing to do only with -v, else one line an hour counting them.
    An idle daemon so writes about 24 lines a day, not one per pass."""

    def __init__(self, verbose: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.verbose = verbose
        self.clock = clock
        self.skip_state: str | None = None  # "offline" or "backoff" while it lasts
        self.idle = 0
        self.last_line = clock()

    def _say(self, emit: Callable[[str], None], text: str) -> None:
        emit(text)
        self.last_line = self.clock()

    def report(self, summary: PassSummary, line: str) -> None:
        skip = summary.skipped if summary.skipped in (Stop.OFFLINE, Stop.BACKOFF) else None
        if skip is not None:
            if skip != self.skip_state or self.verbose:
                if summary.message and not summary.message_logged:
                    self._say(log.warning, summary.message)
                self._say(log.info, f"{line} (logged again when this changes)")
            self.skip_state = skip
            return
        if self.skip_state is not None:
            was = "unreachable" if self.skip_state == "offline" else "asking to back off"
            self._say(log.info, f"the server is no longer {was}")
            self.skip_state = None
        if summary.skipped == Stop.AUTH:
            log.error(
                f"{summary.message}; trying again at the next interval (send SIGHUP after "
                "changing the token)"
            )
        elif summary.message and not summary.ok and not summary.message_logged:
            log.warning(summary.message)
        counts = summary.public()
        changed = any(
            isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in counts.items()
            if k != "handed_to_daemon"
        )
        if changed or not summary.ok or self.verbose:
            self._say(log.info, line)
            self.idle = 0
            return
        self.idle += 1
        if self.clock() - self.last_line >= IDLE_SUMMARY_SECONDS:
            self._say(log.info, f"{self.idle} idle passes in the last hour")
            self.idle = 0


def run_sync_command(
    settings: Settings,
    store: Store,
    as_json: bool,
    force_delete: bool,
    quiet: bool = False,
    wait: bool = False,
    reupload: bool = False,
) -> int:
    """`jobsyncd sync`. With `quiet` (-q) stdout stays empty unless `--json`: cron mails any
    output, so a good pass must print nothing; a bad one still gets its error line on stderr.
    With `wait`, a pass handed to a daemon is waited for, and reported as if it ran here."""
    # Exit 78 before anything else; the HTTP layer's own parse of the URL waits for a pass run
    # here (execute_pass): one handed to a daemon never imports it.
    check_server_url(settings, http_layer=False)
    token, warnings = read_token(settings)
    for message in warnings:
        log.warning(message)
    from .wakeup import daemon_pid, request_sync

    # --force-delete and --reupload are never handed over: the daemon's own passes keep the
    # deletion guard, so the answered pass runs here, between the daemon's passes (they share
    # the sync lock).
    pid = None if (force_delete or reupload) else daemon_pid(settings.data_dir)
    if pid is not None and wait:
        answer = _wait_for_daemon(settings)
        if answer is not None:
            return _report_daemon_pass(answer, pid, as_json, quiet)
    elif pid is not None and request_sync(settings.data_dir):
        summary = PassSummary(handed_to_daemon=pid or None)
        if as_json:
            print(json.dumps(summary.public()))
        elif not quiet:
            print(f"a daemon is running (pid {pid}); asked it to sync now")
        return 0
    lock = sync_lock(settings.data_dir)
    with lock:
        factory = None
        if not as_json and sys.stderr.isatty():
            factory = _progress_factory
        summary = execute_pass(
            settings,
            store,
            token,
            force_delete=force_delete,
            progress_factory=factory,
            reupload=reupload,
        )
    if as_json:
        print(json.dumps(summary.public()))
    elif not quiet:
        print(describe(summary))
    _log_outcome(summary.ok, summary.skipped, summary.message, summary.errors, summary.failed)
    return exit_code_for(summary)


def _log_outcome(
    ok: bool, skipped: str | None, message: str | None, errors: int, failed: int
) -> None:
    if message and not ok:
        if skipped in (Stop.OFFLINE, Stop.BACKOFF):
            log.error(f"{message} (try again later)")
        else:
            log.error(message)
    elif not ok:
        log.error(
            f"{errors} job(s) errored and {failed} failed in this pass; see "
            "`jobsyncd list --status error --status failed`"
        )


def _wait_for_daemon(settings: Settings) -> dict[str, Any] | None:
    """`sync --wait`: ask the daemon for a pass and wait for the answer of the first pass that
    starts after the request (at most 3 x the daemon's interval). None when no daemon took the
    request (it just stopped): the pass then runs here."""
    import select
    import socket

    from .wakeup import SOCKET_NAME, WAIT_PREFIX, reply_socket_name

    name = reply_socket_name()
    path = os.path.join(settings.data_dir, name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        try:
            sock.bind(path)
            sock.sendto(WAIT_PREFIX + name.encode(), os.path.join(settings.data_dir, SOCKET_NAME))
        except OSError:
            return None
        started = time.monotonic()
        limit = 3 * settings.interval_seconds  # until the daemon says its own interval
        while True:
            left = started + limit - time.monotonic()
            if left <= 0:
                return {
                    "summary": None,
                    "code": 75,
                    "message": f"the daemon did not report a pass within {limit:g} s (3 x its "
                    "interval); see `jobsyncd status` and the daemon's log",
                }
            if not select.select([sock], [], [], left)[0]:
                continue
            try:
                answer = json.loads(sock.recv(1 << 16))
            except (OSError, ValueError):
                continue
            if not isinstance(answer, dict):
                continue
            if answer.get("ack"):
                interval = answer.get("interval_seconds")
                if isinstance(interval, (int, float)) and interval > 0:
                    limit = 3 * interval
                continue
            return answer
    finally:
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def _summary_from(public: dict[str, Any]) -> PassSummary:
    import dataclasses

    names = {f.name for f in dataclasses.fields(PassSummary)}
    return PassSummary(**{k: v for k, v in public.items() if k in names})


def _report_daemon_pass(answer: dict[str, Any], pid: int, as_json: bool, quiet: bool) -> int:
    """The daemon's answer as if the pass had run here; no pass at all (the daemon stopped or
    did not report) is a summary that is not ok, so `--json` output still parses."""
    summary = answer.get("summary")
    code = answer.get("code")
    code = code if code in (0, 1, 75, 77) else 1
    message = answer.get("message")
    if not isinstance(summary, dict):
        if as_json:
            print(json.dumps(PassSummary(ok=False, handed_to_daemon=pid or None).public()))
        log.error(str(message or "the daemon's pass failed"))
        return code or 1
    if as_json:
        print(json.dumps(summary))
    elif not quiet:
        by = f" (the daemon's pass, pid {summary.get('handed_to_daemon')})"
        print(describe(_summary_from(summary)) + by)
    if code != 0:
        _log_outcome(
            False,
            summary.get("skipped"),
            message,
            summary.get("errors", 0),
            summary.get("failed", 0),
        )
    return code


def check_connection(settings: Settings) -> str:
    """`config check`: the configuration, then at most two authenticated GETs (the change feed,
    else the listing). Returns the line to print on success; raises the error kind whose exit
    code says what failed (78, 75, 77 or 1), with the next step in its message."""
    from .api import AuthRefused, BackOff, Gone, Offline, RemoteError, TLSFailure
    from .config import token_source
    from .errors import ConfigError, CredentialsRefused, TryLater

    api_base = check_server_url(settings)
    token, warnings = read_token(settings)
    for message in warnings:
        log.warning(message)
    remote = make_remote(settings, token)
    from .config import default_config_path

    where = settings.config_path or os.environ.get("JOBSYNCD_CONFIG") or default_config_path()
    try:
        for path in ("/changes?limit=1", "/jobs?limit=1"):
            response, body = remote._send("GET", path)
            if path.startswith("/changes") and response.status_code in (404, 405):
                continue  # no change feed: the listing says as much about the rest
            remote._check_status(response, body, "GET", path)
            remote._json(response, body, "GET", path)
            what = "change feed" if path.startswith("/changes") else "job listing"
            auth = "with the token" if token else "without a token"
            return f"ok: {api_base} answered the {what} {auth}"
        raise RemoteError("no answer")  # not reached: the listing either returns or raises
    except AuthRefused as exc:
        if token is None:
            raise CredentialsRefused(
                f"{exc}; no token configured: set token_file in {where} or JOBSYNCD_TOKEN"
            ) from None
        source, origin = token_source(settings)
        raise CredentialsRefused(
            f"{exc}: the token from {origin or source} was refused; check it with the server's "
            "administrator"
        ) from None
    except Offline as exc:
        raise TryLater(f"{exc}; check the network, or server_url in {where}") from None
    except BackOff as exc:
        raise TryLater(f"{exc}; the server is busy: try again later") from None
    except TLSFailure as exc:
        raise JobsyncdError(
            f"{exc}; if the server uses a private CA, set ca_bundle in {where}"
        ) from None
    except Gone as exc:
        raise ConfigError(
            f"{exc}: {api_base} has no job API; check server_url in {where}"
        ) from None
    except RemoteError as exc:
        raise JobsyncdError(f"{exc}; check server_url in {where} and the server's health") from None
    finally:
        remote.close()
