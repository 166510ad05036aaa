"""The reference server's HTTP API (contract section 7) as a plain WSGI application: routing,
authentication and the answers. settings.py owns the settings, body.py reads request bodies,
validation.py decides what may be stored, storage/ owns the data. No request, however malformed,
gets a traceback.
"""

from __future__ import annotations

import email.message
import hmac
import json
import math
import os
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import platformdirs

from jobsyncd.server import batch, validation
from jobsyncd.server.body import MAX_JSON_BYTES, Body, Multipart, read_json_body, sanitise_filename
from jobsyncd.server.errors import ConfigError, HTTPError
from jobsyncd.server.settings import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_USER,
    ENV_AUDIO_DIR,
    ENV_DB,
    ENV_MAX_UPLOAD,
    ENV_TOKEN_FILE,
    ENV_TOMBSTONE_DAYS,
    load_tokens,
    parse_days,
    parse_size,
)
from jobsyncd.server.storage import (
    AudioDir,
    AudioUpload,
    CheckpointDiverged,
    CheckpointExpired,
    SQLStorage,
    StorageBusy,
    StoredAudio,
    open_storage,
)
from jobsyncd.server.uploads import UploadError, UploadStore, handle

__all__ = [
    "CLOSE_CONNECTION_KEY",
    "ENV_AUDIO_DIR",
    "ENV_DB",
    "ENV_MAX_UPLOAD",
    "ENV_TOKEN_FILE",
    "ENV_TOMBSTONE_DAYS",
    "USER_KEY",
    "ConfigError",
    "HTTPError",
    "JobServerApp",
    "create_app",
    "default_db_path",
]

API_PREFIX = "/api/v1/jobs"
CHANGES_PATH = "/api/v1/changes"
BATCH_PATH = "/api/v1/batch"
UPLOADS_PATH = "/api/v1/uploads"
REPEAT_WAIT_SECONDS = 2.0  # how long a create whose upload another request took looks for its job
MAX_WAIT_SECONDS = 60.0
DEFAULT_TOMBSTONE_DAYS = 30.0
PURGE_INTERVAL_SECONDS = 3600.0
DRAIN_FACTOR = 4  # after a 413, read and discard up to this many times the limit, then close
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000

# A WSGI server may offer this environ key (our cli.py does) to close the connection after the
# answer, when a too-large body could not be drained.
CLOSE_CONNECTION_KEY = "jobsyncd.close_connection"
USER_KEY = "jobsyncd.user"

_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{1,70}")
_JSON_HEADERS = [("Content-Type", "application/json")]


def _status_line(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


def _error_body(message: str, extra: dict[str, str] | None = None) -> bytes:
    return json.dumps({"error": message, **(extra or {})}).encode()


def default_db_path() -> str:
    return os.path.join(platformdirs.user_data_dir("jobsyncd-server"), "jobs.sqlite3")


def create_app(
    db_path: str | os.PathLike[str] | None = None,
    audio_dir: str | os.PathLike[str] | None = None,
    token_file: str | os.PathLike[str] | None = None,
    max_upload_bytes: int | None = None,
    tombstone_days: float | None = None,
) -> JobServerApp:
    """The WSGI application; arguments left out come from JOBSYNCD_SERVER_* or the defaults.

    `gunicorn 'jobsyncd.server:create_app()'` serves it with settings from the environment.
    """
    data_dir = platformdirs.user_data_dir("jobsyncd-server")
    db_path = db_path or os.environ.get(ENV_DB) or default_db_path()
    audio_dir = audio_dir or os.environ.get(ENV_AUDIO_DIR) or os.path.join(data_dir, "audio")
    token_file = token_file or os.environ.get(ENV_TOKEN_FILE) or None
    if max_upload_bytes is None:
        env_max = os.environ.get(ENV_MAX_UPLOAD)
        max_upload_bytes = (
            parse_size(env_max, ENV_MAX_UPLOAD) if env_max else DEFAULT_MAX_UPLOAD_BYTES
        )
    elif max_upload_bytes < 1:
        raise ConfigError("max upload bytes must be at least 1")
    if tombstone_days is None:
        env_days = os.environ.get(ENV_TOMBSTONE_DAYS)
        tombstone_days = (
            parse_days(env_days, ENV_TOMBSTONE_DAYS) if env_days else DEFAULT_TOMBSTONE_DAYS
        )
    else:
        tombstone_days = parse_days(str(tombstone_days), "--tombstone-days")
    tokens = load_tokens(token_file) if token_file else None
    storage = open_storage(str(db_path))
    storage.purge_tombstones(tombstone_days)  # at start, then hourly (JobServerApp._upkeep)
    audio = AudioDir(audio_dir)
    uploads = UploadStore(audio.root, max_upload_bytes)
    uploads.expire()  # at start, then hourly (JobServerApp._upkeep)
    return JobServerApp(storage, audio, tokens, max_upload_bytes, tombstone_days, uploads)


class JobServerApp:
    """The WSGI callable. Every answer is JSON with a Content-Length, or 204/304 with no body."""

    def __init__(
        self,
        storage: SQLStorage,
        audio_dir: AudioDir,
        tokens: list[tuple[bytes, str]] | None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        tombstone_days: float = DEFAULT_TOMBSTONE_DAYS,
        uploads: UploadStore | None = None,
    ) -> None:
        self.storage = storage
        self.audio_dir = audio_dir
        self.uploads = uploads or UploadStore(audio_dir.root, max_upload_bytes)
        self.tokens = tokens
        self.max_upload_bytes = max_upload_bytes
        self.tombstone_days = tombstone_days
        self.purge_interval = PURGE_INTERVAL_SECONDS
        self._upkeep_pid = 0
        self._upkeep_lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body: Body | None = None
        self._start_upkeep()
        path = environ.get("PATH_INFO", "")
        if path == UPLOADS_PATH or path.startswith(UPLOADS_PATH + "/"):
            return self._uploads(environ, start_response)
        try:
            try:
                body = Body(environ)
                status, headers, payload = self._handle(environ, body)
            except StorageBusy as e:
                print(f"jobsyncd-server: {e}", file=sys.stderr)
                status, headers, payload = (
                    503,
                    [*_JSON_HEADERS, ("Retry-After", "1")],
                    _error_body("the database is busy; try again shortly"),
                )
            except HTTPError as e:
                status, headers, payload = (
                    e.status,
                    _JSON_HEADERS + e.headers,
                    _error_body(e.message, e.extra),
                )
            if body is not None and not body.exhausted:
                multipart = "multipart" in environ.get("CONTENT_TYPE", "").lower()
                limit = self.max_upload_bytes if multipart else MAX_JSON_BYTES
                if environ.get("PATH_INFO") == BATCH_PATH:
                    limit = batch.MAX_BATCH_BYTES
                body.discard(DRAIN_FACTOR * limit)
                close = environ.get(CLOSE_CONNECTION_KEY)
                if not body.exhausted and callable(close):
                    close()
        except Exception:
            print("jobsyncd-server: internal error:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            status, headers, payload = 500, list(_JSON_HEADERS), _error_body("internal error")
        if payload:
            headers = [*headers, ("Content-Length", str(len(payload)))]
        start_response(_status_line(status), headers)
        return [payload] if payload else []

    # -- /api/v1/uploads (tus 1.0.0: uploads.py reads and drains the body itself)

    def _uploads(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        user: str | None = None
        if environ.get("REQUEST_METHOD") != "OPTIONS":  # the offer needs no token
            try:
                user = self._user(environ)
            except HTTPError:
                user = None  # handle() answers 401 (and drains the body) for all but OPTIONS
        environ[USER_KEY] = user or "-"
        try:
            return handle(environ, start_response, user, self.uploads, UPLOADS_PATH)
        except Exception:
            print("jobsyncd-server: internal error:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            payload = _error_body("internal error")
            close = environ.get(CLOSE_CONNECTION_KEY)
            if callable(close):
                close()  # the body may be left unread
            start_response(
                _status_line(500), [*_JSON_HEADERS, ("Content-Length", str(len(payload)))]
            )
            return [payload]

    # -- upkeep

    def _start_upkeep(self) -> None:
        """The hourly tombstone purge, in a thread of each process that serves (started at the
        first request, so that a process forked by gunicorn gets its own)."""
        if self._upkeep_pid == os.getpid():
            return
        with self._upkeep_lock:
            if self._upkeep_pid != os.getpid():
                self._upkeep_pid = os.getpid()
                threading.Thread(target=self._upkeep, name="jobsyncd-upkeep", daemon=True).start()

    def _upkeep(self) -> None:
        while True:
            time.sleep(self.purge_interval)
            try:
                self.storage.purge_tombstones(self.tombstone_days)
            except Exception as e:  # the next hour tries again; the server keeps serving
                print(f"jobsyncd-server: tombstone purge failed: {e}", file=sys.stderr)
            try:
                self.uploads.expire()
            except Exception as e:
                print(f"jobsyncd-server: upload expiry failed: {e}", file=sys.stderr)

    # -- dispatch

    def _user(self, environ: dict[str, Any]) -> str:
        if self.tokens is None:
            return DEFAULT_USER
        scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            # WSGI hands headers over as latin-1; get the bytes back.
            given = credentials.strip().encode("latin-1", "replace")
            user = None
            for token, name in self.tokens:  # look at every token: no early exit to time
                if hmac.compare_digest(given, token) and user is None:
                    user = name
            if user is not None:
                return user
        raise HTTPError(
            401, "missing or wrong token", [("WWW-Authenticate", 'Bearer realm="jobsyncd"')]
        )

    def _handle(
        self, environ: dict[str, Any], body: Body
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == CHANGES_PATH:
            user = self._user(environ)
            environ[USER_KEY] = user
            if method != "GET":
                raise HTTPError(405, f"{method} not allowed here", [("Allow", "GET")])
            return self._changes(environ, user)
        if path == BATCH_PATH:
            user = self._user(environ)
            environ[USER_KEY] = user
            if method != "POST":
                raise HTTPError(405, f"{method} not allowed here", [("Allow", "POST")])
            return self._batch(environ, body, user)
        if path != API_PREFIX and not path.startswith(API_PREFIX + "/"):
            raise HTTPError(404, "not found")
        user = self._user(environ)
        environ[USER_KEY] = user
        if path == API_PREFIX:
            if method == "GET":
                return self._list(environ, user)
            if method == "POST":
                return self._create(environ, body, user)
            raise HTTPError(405, f"{method} not allowed here", [("Allow", "GET, POST")])
        job_id = path[len(API_PREFIX) + 1 :]
        if not job_id or "/" in job_id:
            raise HTTPError(404, "not found")
        if method == "GET":
            job = self.storage.get_job(user, job_id)
            if job is None:
                raise HTTPError(404, "no such job")
            return 200, list(_JSON_HEADERS), job.encode()
        if method == "PATCH":
            return self._update(environ, body, user, job_id)
        if method == "DELETE":
            deleted, audio_name = self.storage.delete_job(user, job_id)
            if not deleted:
                raise HTTPError(404, "no such job")
            self.audio_dir.remove(audio_name)
            return 204, [], b""
        raise HTTPError(405, f"{method} not allowed here", [("Allow", "GET, PATCH, DELETE")])

    # -- GET /api/v1/jobs

    def _list(self, environ: dict[str, Any], user: str) -> tuple[int, list[tuple[str, str]], bytes]:
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        for name in ("limit", "cursor"):
            if len(query.get(name, ())) > 1:
                raise HTTPError(400, f"{name} given more than once")
        limit = DEFAULT_LIMIT
        if "limit" in query:
            text = query["limit"][0]
            if not (text.isascii() and text.isdigit()) or int(text) < 1:
                raise HTTPError(400, "limit must be a whole number of at least 1")
            limit = min(int(text), MAX_LIMIT)
        after = 0
        cursor = query.get("cursor", [""])[0]
        if cursor:
            seq = self.storage.read_cursor(user, cursor)
            if seq is None:
                raise HTTPError(400, "cursor not valid (not one this server gave out)")
            after = seq
        wanted = environ.get("HTTP_IF_NONE_MATCH")
        if wanted is not None:
            current = self.storage.etag(user)
            if _etag_matches(wanted, current):
                return 304, [("ETag", current)], b""
        etag, jobs, last_seq = self.storage.list_page(user, after, limit)
        if wanted is not None and _etag_matches(wanted, etag):
            return 304, [("ETag", etag)], b""
        next_cursor = (
            "null" if last_seq is None else f'"{self.storage.make_cursor(user, last_seq)}"'
        )
        payload = f'{{"jobs":[{",".join(jobs)}],"next_cursor":{next_cursor}}}'.encode()
        return 200, [*_JSON_HEADERS, ("ETag", etag)], payload

    # -- GET /api/v1/changes (CouchDB's _changes with feed=longpoll is the model)

    def _changes(
        self, environ: dict[str, Any], user: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        for name in ("since", "limit", "wait"):
            if len(query.get(name, ())) > 1:
                raise HTTPError(400, f"{name} given more than once")
        limit = DEFAULT_LIMIT
        if "limit" in query:
            text = query["limit"][0]
            if not (text.isascii() and text.isdigit()) or int(text) < 1:
                raise HTTPError(400, "limit must be a whole number of at least 1")
            limit = min(int(text), MAX_LIMIT)
        wait = 0.0
        if "wait" in query:
            wait = _seconds(query["wait"][0])
        checkpoint = query.get("since", [""])[0]
        try:
            since = self.storage.read_checkpoint(user, checkpoint) if checkpoint else None
            deadline = time.monotonic() + wait
            while True:
                page = self.storage.changes(user, since, limit)
                remaining = deadline - time.monotonic()
                if page.changes or remaining <= 0:
                    break
                self.storage.wait_for_change(user, page.version, remaining)
        except CheckpointDiverged as e:
            raise HTTPError(410, str(e), extra={"reason": "diverged"}) from None
        except CheckpointExpired as e:
            raise HTTPError(410, str(e), extra={"reason": "expired"}) from None
        next_checkpoint = self.storage.make_checkpoint(user, page.next_seq)
        more = "true" if page.more else "false"
        payload = (
            f'{{"changes":[{",".join(page.changes)}],"next":"{next_checkpoint}","more":{more}}}'
        ).encode()
        return 200, list(_JSON_HEADERS), payload

    # -- POST /api/v1/batch

    def _batch(
        self, environ: dict[str, Any], body: Body, user: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        media, _ = self._media_type(environ)
        if media != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        document = read_json_body(body, batch.MAX_BATCH_BYTES, strict_numbers=False)
        operations = batch.check_document(document)
        may_be_large = body.size_read > MAX_JSON_BYTES
        answers: list[str | None] = []
        checked = []
        for operation in operations:
            try:
                checked.append(batch.check_operation(operation, may_be_large))
                answers.append(None)
            except HTTPError as e:
                answers.append(batch.result(e.status, error=e.message))
        applied, unlinked = self.storage.apply_batch(user, checked) if checked else ([], [])
        for name in unlinked:
            self.audio_dir.remove(name)
        done = iter(applied)
        for i, answer in enumerate(answers):
            if answer is None:
                status, job = next(done)
                answers[i] = batch.result(status, job, "no such job" if status == 404 else None)
        payload = f'{{"results":[{",".join(a or "" for a in answers)}]}}'.encode()
        return 200, list(_JSON_HEADERS), payload

    # -- POST /api/v1/jobs

    def _media_type(self, environ: dict[str, Any]) -> tuple[str, email.message.Message]:
        raw = environ.get("CONTENT_TYPE", "")
        message = email.message.Message()
        message["Content-Type"] = raw
        media = raw.split(";")[0].strip().lower()
        if media not in ("application/json", "multipart/form-data"):
            raise HTTPError(
                415,
                "Content-Type must be application/json or multipart/form-data",
                [("Accept-Post", "application/json, multipart/form-data")],
            )
        return media, message

    def _multipart(
        self, body: Body, message: email.message.Message, environ: dict[str, Any]
    ) -> tuple[dict[str, str], AudioUpload | None]:
        boundary = message.get_param("boundary")
        if not isinstance(boundary, str) or not _BOUNDARY_RE.fullmatch(boundary):
            raise HTTPError(400, "multipart/form-data without a valid boundary")
        if (
            body.remaining is not None
            and body.remaining > self.max_upload_bytes + 2 * MAX_JSON_BYTES
        ):
            raise HTTPError(
                413, f"body larger than the limit ({self.max_upload_bytes} bytes of audio)"
            )
        return Multipart(body, boundary, self.audio_dir, self.max_upload_bytes).parse()

    def _create(
        self, environ: dict[str, Any], body: Body, user: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        media, message = self._media_type(environ)
        upload: AudioUpload | None = None
        named: tuple[str, str] | None = None
        if media == "application/json":
            document = read_json_body(body)
            validation.check_fields(document, validation.JSON_POST_FIELDS)
            local_id = validation.check_local_id(document.get("local_id"))
            text = validation.check_text(document.get("text"))
            metadata = validation.check_metadata(document.get("metadata", {}))
            named = _named_upload(document)
        else:
            fields, upload = self._multipart(body, message, environ)
            try:
                validation.check_fields(fields, validation.POST_FIELDS)
                local_id = validation.check_local_id(fields.get("local_id"))
                text = validation.check_text(fields.get("text"))
                metadata = (
                    validation.metadata_field(fields["metadata"]) if "metadata" in fields else {}
                )
            except BaseException:
                if upload is not None:
                    upload.discard()
                raise
        if named is not None:
            # A repeat of a create whose answer was lost: the stored job, the upload left alone.
            existing = self.storage.find_local(user, local_id)
            if existing is not None:
                return 200, list(_JSON_HEADERS), existing.encode()
            stored = self._consume(user, *named)
            if stored is None:  # a concurrent identical create took the upload
                existing = self._wait_for_local(user, local_id)
                return 200, list(_JSON_HEADERS), existing.encode()
        else:
            stored = self._commit(upload)
        try:
            job, created = self.storage.create_job(user, local_id, text, metadata, stored)
        except BaseException:
            self.audio_dir.remove(stored.name if stored else None)
            raise
        if not created and stored is not None:
            self.audio_dir.remove(stored.name)  # a repeat: the existing job stays unchanged
        return (201 if created else 200), list(_JSON_HEADERS), job.encode()

    def _consume(self, user: str, upload_id: str, filename: str) -> StoredAudio | None:
        """Take the user's finished upload into the audio dir under a new name, as a committed
        multipart part; None when it went between the check and the taking (404)."""
        try:
            self.uploads.finished(user, upload_id)
        except UploadError:
            raise HTTPError(422, "audio_upload: no finished upload with this id") from None
        name = uuid.uuid4().hex
        try:
            consumed = self.uploads.consume(user, upload_id, dest=self.audio_dir.path(name))
        except UploadError as e:
            if e.status == 404:
                return None
            raise HTTPError(422, "audio_upload: no finished upload with this id") from None
        return StoredAudio(name, sanitise_filename(filename), consumed.size, consumed.sha256)

    def _wait_for_local(self, user: str, local_id: str) -> str:
        """The job another request is creating under `local_id` with the same upload; 422 when
        none appears within REPEAT_WAIT_SECONDS (the upload went some other way)."""
        deadline = time.monotonic() + REPEAT_WAIT_SECONDS
        while True:
            job = self.storage.find_local(user, local_id)
            if job is not None:
                return job
            if time.monotonic() >= deadline:
                raise HTTPError(422, "audio_upload: no finished upload with this id")
            time.sleep(0.05)

    def _commit(self, upload: AudioUpload | None) -> StoredAudio | None:
        if upload is None:
            return None
        try:
            return upload.commit()
        except BaseException:
            upload.discard()
            raise

    # -- PATCH /api/v1/jobs/{id}

    def _update(
        self, environ: dict[str, Any], body: Body, user: str, job_id: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if not self.storage.exists(user, job_id):
            raise HTTPError(404, "no such job")
        media, message = self._media_type(environ)
        upload: AudioUpload | None = None
        changes: dict[str, Any] = {}
        named: tuple[str, str] | None = None
        if media == "application/json":
            document = read_json_body(body)
            validation.check_fields(document, validation.JSON_PATCH_FIELDS)
            named = _named_upload(document)
            if "audio" in document:
                if document["audio"] is not None:
                    raise HTTPError(422, "audio must be null (to remove the audio), or left out")
                if named is not None:
                    raise HTTPError(422, '"audio": null and audio_upload cannot go together')
                changes["audio"] = None
        else:
            fields, upload = self._multipart(body, message, environ)
            document = dict(fields)
        try:
            allowed = (
                validation.JSON_PATCH_FIELDS
                if media == "application/json"
                else validation.PATCH_FIELDS
            )
            validation.check_fields(document, allowed)
            if "text" in document:
                changes["text"] = validation.check_text(document["text"])
            if "metadata" in document:
                value = document["metadata"]
                changes["metadata"] = (
                    validation.check_metadata(value)
                    if media == "application/json"
                    else validation.metadata_field(value)
                )
            if "status" in document:
                changes["status"] = validation.check_status(document["status"])
        except BaseException:
            if upload is not None:
                upload.discard()
            raise
        if named is not None:
            stored = self._consume(user, *named)
            if stored is None:
                raise HTTPError(422, "audio_upload: no finished upload with this id")
        else:
            stored = self._commit(upload)
        try:
            job, replaced = self.storage.update_job(user, job_id, changes, stored)
        except BaseException:
            self.audio_dir.remove(stored.name if stored else None)
            raise
        if job is None:
            self.audio_dir.remove(stored.name if stored else None)
            raise HTTPError(404, "no such job")
        self.audio_dir.remove(replaced)
        return 200, list(_JSON_HEADERS), job.encode()


def _named_upload(document: dict[str, Any]) -> tuple[str, str] | None:
    """(upload id, file name) of `audio_upload` + `audio_filename`, both or neither (else 422)."""
    upload_id = document.get("audio_upload")
    filename = document.get("audio_filename")
    if upload_id is None and filename is None:
        return None
    if upload_id is None or filename is None:
        raise HTTPError(422, "audio_upload and audio_filename go together (both or neither)")
    if not isinstance(upload_id, str) or not upload_id:
        raise HTTPError(422, "audio_upload must be the id of a finished upload")
    if not isinstance(filename, str) or validation.has_lone_surrogate(filename):
        raise HTTPError(422, "audio_filename must be a string")
    return upload_id, filename


def _seconds(text: str) -> float:
    """A long-poll's `wait`: a number of seconds, 0 or more; above 60 is taken as 60."""
    try:
        value = float(text) if text.isascii() else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise HTTPError(400, "wait must be a number of seconds (0 to 60)")
    return min(value, MAX_WAIT_SECONDS)


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 13.1.2)."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(part.strip().removeprefix("W/") == bare for part in header.split(","))
