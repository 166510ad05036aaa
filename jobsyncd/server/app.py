"""The reference server's HTTP API (contract section 7) as a plain WSGI application.

Owns routing, authentication, request parsing (JSON and a streaming multipart/form-data reader)
and the error answers; storage.py owns the data. No request, however malformed, gets a traceback.
"""

from __future__ import annotations

import email.message
import email.utils
import hmac
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import platformdirs

from jobsyncd.server.storage import AudioDir, AudioUpload, Storage, StoredAudio

API_PREFIX = "/api/v1/jobs"
MAX_JSON_BYTES = 1 << 20  # JSON bodies, and the non-file fields of a multipart body together
DEFAULT_MAX_UPLOAD_BYTES = 64 << 20  # the `audio` part
DRAIN_FACTOR = 4  # after a 413, read and discard up to this many times the limit, then close
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
MAX_STATUS_CHARS = 100
DEFAULT_USER = "default"  # the collection of a server without tokens or with a single token

ENV_DB = "JOBSYNCD_SERVER_DB"
ENV_AUDIO_DIR = "JOBSYNCD_SERVER_AUDIO_DIR"
ENV_TOKEN_FILE = "JOBSYNCD_SERVER_TOKEN_FILE"
ENV_MAX_UPLOAD = "JOBSYNCD_SERVER_MAX_UPLOAD_BYTES"

# A WSGI server may offer this environ key (our cli.py does) to close the connection after the
# answer, when a too-large body could not be drained.
CLOSE_CONNECTION_KEY = "jobsyncd.close_connection"
USER_KEY = "jobsyncd.user"

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{1,70}")
_JSON_HEADERS = [("Content-Type", "application/json")]
_CHUNK = 1 << 16


class ConfigError(ValueError):
    """A setting (token file, size limit) that the server refuses to start with."""


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def _status_line(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


# -- settings -------------------------------------------------------------------------------------


def load_tokens(path: str | os.PathLike[str]) -> list[tuple[bytes, str]]:
    """The token file: one line without a space (one token, one user), or lines `NAME TOKEN`.

    Blank lines and `#` comments are allowed; anything else raises ConfigError.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read token file {path}: {e}") from None
    single: list[str] = []
    named: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) == 1:
            single.append(fields[0])
        elif len(fields) == 2:
            named.append((fields[0], fields[1]))
        else:
            raise ConfigError(f"token file {path}, line {number}: expected TOKEN or NAME TOKEN")
    if single and (named or len(single) > 1):
        raise ConfigError(
            f"token file {path}: either one line with a single token, or lines NAME TOKEN"
        )
    if single:
        return [(single[0].encode(), DEFAULT_USER)]
    if not named:
        raise ConfigError(f"token file {path}: no token in it")
    names = [name for name, _ in named]
    tokens = [token for _, token in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"token file {path}: a user name appears twice")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"token file {path}: a token appears twice")
    return [(token.encode(), name) for name, token in named]


def parse_size(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{what}: not a whole number of bytes: {text!r}") from None
    if value < 1:
        raise ConfigError(f"{what}: must be at least 1 byte")
    return value


def create_app(
    db_path: str | os.PathLike[str] | None = None,
    audio_dir: str | os.PathLike[str] | None = None,
    token_file: str | os.PathLike[str] | None = None,
    max_upload_bytes: int | None = None,
) -> JobServerApp:
    """The WSGI application; arguments left out come from JOBSYNCD_SERVER_* or the defaults.

    `gunicorn 'jobsyncd.server:create_app()'` serves it with settings from the environment.
    """
    data_dir = platformdirs.user_data_dir("jobsyncd-server")
    db_path = db_path or os.environ.get(ENV_DB) or os.path.join(data_dir, "jobs.sqlite3")
    audio_dir = audio_dir or os.environ.get(ENV_AUDIO_DIR) or os.path.join(data_dir, "audio")
    token_file = token_file or os.environ.get(ENV_TOKEN_FILE) or None
    if max_upload_bytes is None:
        env_max = os.environ.get(ENV_MAX_UPLOAD)
        max_upload_bytes = (
            parse_size(env_max, ENV_MAX_UPLOAD) if env_max else DEFAULT_MAX_UPLOAD_BYTES
        )
    elif max_upload_bytes < 1:
        raise ConfigError("max upload bytes must be at least 1")
    tokens = load_tokens(token_file) if token_file else None
    return JobServerApp(Storage(db_path), AudioDir(audio_dir), tokens, max_upload_bytes)


# -- request bodies -------------------------------------------------------------------------------


class Body:
    """The request body, never read past its Content-Length; knows whether it was read whole."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self._input = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH", "")
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if length and not chunked:
            if not length.isdigit():
                raise HTTPError(400, "Content-Length is not a number")
            self.remaining: int | None = int(length)
        elif chunked:
            self.remaining = None  # read until the server signals the end
        else:
            self.remaining = 0
        self.exhausted = self.remaining == 0

    def read(self, size: int) -> bytes:
        if self.exhausted:
            return b""
        if self.remaining is not None:
            size = min(size, self.remaining)
        try:
            data = self._input.read(size)
        except Exception:  # a broken connection or chunked framing: the server's reader decides
            self.exhausted = True
            raise HTTPError(400, "could not read the request body") from None
        if self.remaining is not None:
            self.remaining -= len(data)
            if self.remaining == 0:
                self.exhausted = True
            elif not data:
                self.exhausted = True
                raise HTTPError(400, "request body shorter than its Content-Length")
        elif not data:
            self.exhausted = True
        return data

    def discard(self, allowance: int) -> None:
        """Read and throw away up to `allowance` bytes of what is left."""
        try:
            while not self.exhausted and allowance > 0:
                data = self.read(min(_CHUNK, allowance))
                allowance -= len(data)
        except (HTTPError, OSError, ValueError):
            pass


def _loads(text: str | bytes) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _read_json_body(body: Body) -> dict[str, Any]:
    if body.remaining is not None and body.remaining > MAX_JSON_BYTES:
        raise HTTPError(413, f"JSON body larger than {MAX_JSON_BYTES} bytes")
    chunks = []
    size = 0
    while True:
        data = body.read(_CHUNK)
        if not data:
            break
        size += len(data)
        if size > MAX_JSON_BYTES:
            raise HTTPError(413, f"JSON body larger than {MAX_JSON_BYTES} bytes")
        chunks.append(data)
    try:
        document = _loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None
    if not isinstance(document, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return document


class _Multipart:
    """A streaming multipart/form-data reader (RFC 7578): fields kept in memory up to a limit, the
    `audio` part streamed into an AudioUpload. The stdlib `cgi` module is gone in Python 3.13."""

    def __init__(self, body: Body, boundary: str, audio_dir: AudioDir, max_audio: int) -> None:
        self.body = body
        # A CRLF in front lets the first delimiter look like every other one.
        self.buf = bytearray(b"\r\n")
        self.sep = b"\r\n--" + boundary.encode("ascii")
        self.audio_dir = audio_dir
        self.max_audio = max_audio
        self.fields: dict[str, str] = {}
        self.audio: AudioUpload | None = None
        self.field_bytes = 0

    def _fill(self) -> None:
        data = self.body.read(_CHUNK)
        if not data:
            raise HTTPError(400, "malformed multipart body: it ends early")
        self.buf += data

    def _until(self, sep: bytes, sink: Callable[[bytes], None], limit_message: str = "") -> None:
        keep = len(sep) - 1
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                sink(bytes(self.buf[:i]))
                del self.buf[: i + len(sep)]
                return
            if len(self.buf) > keep:
                sink(bytes(self.buf[:-keep]))
                del self.buf[:-keep]
            self._fill()

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            self._fill()

    def parse(self) -> tuple[dict[str, str], AudioUpload | None]:
        try:
            self._parse()
        except BaseException:
            if self.audio is not None:
                self.audio.discard()
                self.audio = None
            raise
        return self.fields, self.audio

    def _parse(self) -> None:
        preamble = [0]

        def skip(data: bytes) -> None:
            preamble[0] += len(data)
            if preamble[0] > _CHUNK:
                raise HTTPError(400, "malformed multipart body: no boundary found")

        self._until(self.sep, skip)
        while True:
            self._need(2)
            if self.buf[:2] == b"--":
                return  # the closing delimiter; an epilogue is ignored
            # Transport padding (RFC 2046) may precede the CRLF.
            while self.buf[:1] in (b" ", b"\t"):
                del self.buf[:1]
                self._need(2)
            if self.buf[:2] != b"\r\n":
                raise HTTPError(400, "malformed multipart body: bad delimiter line")
            del self.buf[:2]
            headers = self._headers()
            self._part(headers)

    def _headers(self) -> email.message.Message:
        while True:
            if self.buf.startswith(b"\r\n"):
                block, rest = b"", 2
                break
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                block, rest = bytes(self.buf[:i]), i + 4
                break
            if len(self.buf) > 16384:
                raise HTTPError(400, "malformed multipart body: part headers too long")
            self._fill()
        del self.buf[:rest]
        message = email.message.Message()
        for line in block.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise HTTPError(400, "malformed multipart body: bad part header")
            message[name.strip()] = value.strip()
        return message

    def _part(self, headers: email.message.Message) -> None:
        disposition = headers.get("Content-Disposition", "")
        if disposition.split(";")[0].strip().lower() != "form-data":
            raise HTTPError(400, "malformed multipart body: a part is not form-data")
        name = headers.get_param("name", header="content-disposition")
        if name is None:
            raise HTTPError(400, "malformed multipart body: a part has no name")
        name = email.utils.collapse_rfc2231_value(name)
        if name in self.fields or (name == "audio" and self.audio is not None):
            raise HTTPError(400, f"multipart field {name!r} appears twice")
        if name == "audio":
            self.audio = upload = self.audio_dir.new_upload()
            upload.filename = _sanitise_filename(headers.get_filename())

            def write(data: bytes) -> None:
                if upload.size + len(data) > self.max_audio:
                    raise HTTPError(413, f"audio larger than {self.max_audio} bytes")
                upload.write(data)

            self._until(self.sep, write)
            return
        chunks: list[bytes] = []

        def keep(data: bytes) -> None:
            self.field_bytes += len(data)
            if self.field_bytes > MAX_JSON_BYTES:
                raise HTTPError(413, f"multipart fields larger than {MAX_JSON_BYTES} bytes")
            chunks.append(data)

        self._until(self.sep, keep)
        try:
            self.fields[name] = b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, f"multipart field {name!r} is not UTF-8") from None


def _sanitise_filename(name: str | None) -> str:
    """The client's file name as metadata: last path component, no control characters."""
    if not name:
        return "audio"
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF)
    name = name.strip().lstrip(".")[:255]
    return name or "audio"


# -- values ---------------------------------------------------------------------------------------


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_local_id(value: Any) -> str:
    if value is None:
        raise HTTPError(422, "local_id is required")
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise HTTPError(422, "local_id must be a UUID")
    return value.lower()


def _check_text(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise HTTPError(422, "text must be a string or null")
    if value is not None and not _utf8_ok(value):
        raise HTTPError(422, "text is not valid Unicode")
    return value


def _check_metadata(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise HTTPError(422, "metadata must be a JSON object")
    try:
        json.dumps(value)
    except (ValueError, RecursionError):
        raise HTTPError(422, "metadata cannot be stored") from None
    return value


def _check_status(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_STATUS_CHARS:
        raise HTTPError(422, f"status must be a string of 1 to {MAX_STATUS_CHARS} characters")
    if not _utf8_ok(value):
        raise HTTPError(422, "status is not valid Unicode")
    return value


def _metadata_field(text: str) -> dict[str, Any]:
    try:
        value = _loads(text)
    except (ValueError, RecursionError):
        raise HTTPError(422, "metadata must be a JSON object (as a JSON string)") from None
    return _check_metadata(value)


def _check_fields(document: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        raise HTTPError(
            422, f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )


_POST_FIELDS = ("local_id", "text", "metadata")
_PATCH_FIELDS = ("text", "metadata", "status")


# -- the application ------------------------------------------------------------------------------


class JobServerApp:
    """The WSGI callable. Every answer is JSON with a Content-Length, or 204/304 with no body."""

    def __init__(
        self,
        storage: Storage,
        audio_dir: AudioDir,
        tokens: list[tuple[bytes, str]] | None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:
        self.storage = storage
        self.audio_dir = audio_dir
        self.tokens = tokens
        self.max_upload_bytes = max_upload_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body: Body | None = None
        try:
            try:
                body = Body(environ)
                status, headers, payload = self._handle(environ, body)
            except HTTPError as e:
                status, headers, payload = (
                    e.status,
                    _JSON_HEADERS + e.headers,
                    _error_body(e.message),
                )
            if body is not None and not body.exhausted:
                multipart = "multipart" in environ.get("CONTENT_TYPE", "").lower()
                limit = self.max_upload_bytes if multipart else MAX_JSON_BYTES
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
        return _Multipart(body, boundary, self.audio_dir, self.max_upload_bytes).parse()

    def _create(
        self, environ: dict[str, Any], body: Body, user: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        media, message = self._media_type(environ)
        upload: AudioUpload | None = None
        if media == "application/json":
            document = _read_json_body(body)
            _check_fields(document, _POST_FIELDS)
            local_id = _check_local_id(document.get("local_id"))
            text = _check_text(document.get("text"))
            metadata = _check_metadata(document.get("metadata", {}))
        else:
            fields, upload = self._multipart(body, message, environ)
            try:
                _check_fields(fields, _POST_FIELDS)
                local_id = _check_local_id(fields.get("local_id"))
                text = _check_text(fields.get("text"))
                metadata = _metadata_field(fields["metadata"]) if "metadata" in fields else {}
            except BaseException:
                if upload is not None:
                    upload.discard()
                raise
        stored = self._commit(upload)
        try:
            job, created = self.storage.create_job(user, local_id, text, metadata, stored)
        except BaseException:
            self.audio_dir.remove(stored and stored.name)
            raise
        if not created and stored is not None:
            self.audio_dir.remove(stored.name)  # a repeat: the existing job stays unchanged
        return (201 if created else 200), list(_JSON_HEADERS), job.encode()

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
        if media == "application/json":
            document = _read_json_body(body)
            _check_fields(document, _PATCH_FIELDS)
        else:
            fields, upload = self._multipart(body, message, environ)
            document = dict(fields)
        try:
            _check_fields(document, _PATCH_FIELDS)
            if "text" in document:
                changes["text"] = _check_text(document["text"])
            if "metadata" in document:
                value = document["metadata"]
                changes["metadata"] = (
                    _check_metadata(value)
                    if media == "application/json"
                    else _metadata_field(value)
                )
            if "status" in document:
                changes["status"] = _check_status(document["status"])
        except BaseException:
            if upload is not None:
                upload.discard()
            raise
        stored = self._commit(upload)
        try:
            job, replaced = self.storage.update_job(user, job_id, changes, stored)
        except BaseException:
            self.audio_dir.remove(stored and stored.name)
            raise
        if job is None:
            self.audio_dir.remove(stored and stored.name)
            raise HTTPError(404, "no such job")
        self.audio_dir.remove(replaced)
        return 200, list(_JSON_HEADERS), job.encode()


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 13.1.2)."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(part.strip().removeprefix("W/") == bare for part in header.split(","))
