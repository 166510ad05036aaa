"""The HTTP client of the job API (contract section 7), on one keep-alive requests.Session.

Every failure is turned into one of a few kinds the sync pass sorts on: Offline, TLSFailure,
AuthRefused, BackOff(retry_after), Transient, Permanent(message), Gone. Answers are bounded in
size and in time (a whole answer within 3x the read timeout); redirects are never followed; the
token travels in an AuthBase so that requests never swaps it for ~/.netrc credentials.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import email.utils
import hashlib
import http.client
import io
import json
import math
import os
import re
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, BinaryIO

import requests  # costs ~80 ms of start-up: only the commands that talk to a server import us
import requests.adapters
import requests.auth
import requests.utils
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions

from . import log
from .api import (  # the kinds live in api.py (no requests); re-exported here
    AnswerTooLarge,
    AuthRefused,
    BackOff,
    BatchNotOffered,
    BatchTooLarge,
    FeedGone,
    FeedNotOffered,
    FeedPage,
    Gone,
    HeldTest,
    InvalidJob,
    InvalidJobObject,
    NotAFeed,
    NotModified,
    Offline,
    Permanent,
    RemoteError,
    ServerJob,
    TLSFailure,
    Tombstone,
    Transient,
    Unchanged,
)

if TYPE_CHECKING:
    from .upload import Uploader

MAX_JOB_ANSWER_BYTES = 4 << 20
MAX_PAGE_ANSWER_BYTES = 64 << 20  # a page of 500 jobs is well under 1 MiB in practice
MAX_TEXT_CHARS = 16 << 20
BACKOFF_DEFAULT = 30.0
BACKOFF_MIN, BACKOFF_MAX = 1.0, 3600.0


class RequestInFlight:
    """One request under way, for the whole-answer limit and the daemon's watchdog.

    The limit runs from the end of sending (when the answer begins to be read) to the last byte
    of the answer, headers included (contract 6.1). The reaper shuts the socket down when it
    passes, whatever the server trickles; `expired` then says the answer was cut, not complete.
    """

    __slots__ = ("started", "limit", "deadline", "expired", "_sock")

    def __init__(self, limit: float) -> None:
        self.started = time.monotonic()
        self.limit = limit
        self.deadline: float | None = None  # set once the request is sent
        self.expired = False
        self._sock: Any = None

    def within_limit(self, now: float) -> bool:
        """True while the request is sending, or its answer is still inside the limit."""
        return self.deadline is None or now <= self.deadline

    def answer_begins(self, sock: Any) -> None:
        _reaper.watch(self, sock)


class _Reaper:
    """One thread for every request's deadline: it shuts down the socket of an answer that
    runs past its limit, which wakes the blocked read at once (a timeout per read cannot see a
    server that sends one byte just before each read would time out)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watched: set[RequestInFlight] = set()
        self._in_flight: set[RequestInFlight] = set()
        self._thread: threading.Thread | None = None
        self.last_finished: float | None = None  # monotonic end of the last request

    def begin(self, flight: RequestInFlight) -> None:
        with self._cond:
            self._in_flight.add(flight)

    def watch(self, flight: RequestInFlight, sock: Any) -> None:
        with self._cond:
            flight.deadline = time.monotonic() + flight.limit
            flight._sock = sock
            self._watched.add(flight)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="jobsyncd-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def end(self, flight: RequestInFlight) -> None:
        with self._cond:
            self._in_flight.discard(flight)
            self._watched.discard(flight)
            flight._sock = None
            self.last_finished = time.monotonic()

    def snapshot(self) -> list[RequestInFlight]:
        with self._cond:
            return list(self._in_flight)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for flight in [f for f in self._watched if f.deadline is not None]:
                    if flight.deadline <= now:  # type: ignore[operator]
                        flight.expired = True
                        _shut_down(flight._sock)
                        self._watched.discard(flight)
                soonest = min((f.deadline or now for f in self._watched), default=None)
                self._cond.wait(None if soonest is None else max(soonest - now, 0.0) + 0.001)


def _shut_down(sock: Any) -> None:
    raw = getattr(sock, "socket", sock)  # urllib3's SSLTransport (TLS in TLS) wraps a socket
    if isinstance(raw, socket.socket):
        try:
            # socket.socket's own shutdown, also for an SSLSocket: the blocked read in the
            # request's thread sees the end of the stream, no TLS state is touched from here.
            socket.socket.shutdown(raw, socket.SHUT_RDWR)
        except OSError:
            pass


_reaper = _Reaper()
_current = threading.local()  # the RequestInFlight of this thread's request, for the connection


def requests_in_flight() -> list[RequestInFlight]:
    """The requests under way in this process (the daemon's watchdog reads them)."""
    return _reaper.snapshot()


def last_request_finished() -> float | None:
    """time.monotonic() when the last request of this process ended, or None."""
    return _reaper.last_finished


class BearerAuth(requests.auth.AuthBase):
    def __init__(self, token: str | None) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __bool__(self) -> bool:
        return True  # present even without a token: keeps requests from reading ~/.netrc

    def __repr__(self) -> str:
        return "BearerAuth(<hidden>)"


def parse_retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds to wait from a Retry-After header (seconds or HTTP date), clamped to 1 s..1 h."""
    seconds = BACKOFF_DEFAULT
    if value:
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = when.timestamp() - (time.time() if now is None else now)
            except (TypeError, ValueError, IndexError, OverflowError):
                seconds = BACKOFF_DEFAULT
        if math.isnan(seconds):
            seconds = BACKOFF_DEFAULT
    return min(max(seconds, BACKOFF_MIN), BACKOFF_MAX)


MAX_ID_CHARS = 256
MAX_METADATA_DEPTH = 32  # the metadata object itself is level 1, as on the server
_DOUBLE_MAX = 1.7976931348623157e308
# RFC 3339 section 5.6 date-time (a space for the T allowed, as its section 5.6 note says).
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def _utf8_clean(text: str) -> bool:
    """False for a string holding a lone surrogate (a "\\ud800" escape): not storable as UTF-8."""
    if text.isascii():
        return True  # the usual case, told without encoding a copy
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _usable_id(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**30:
        value = str(value)
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_ID_CHARS
        or not value.isprintable()
        or not _utf8_clean(value)
    ):
        return None
    return value


_TIMESTAMPS: dict[str, str] = {}  # valid ones seen: a server stamps a batch's jobs alike


def _timestamp(value: str) -> str:
    """A server timestamp in our RFC 3339 UTC `Z` form; ValueError when it is not RFC 3339 in
    the years 1970-9999 (before or after conversion to UTC)."""
    known = _TIMESTAMPS.get(value)
    if known is not None:
        return known
    if len(_TIMESTAMPS) >= 4096:
        _TIMESTAMPS.clear()
    known = _TIMESTAMPS[value] = _parse_timestamp(value)
    return known


def _parse_timestamp(value: str) -> str:
    match = _RFC3339.fullmatch(value) if len(value) <= 64 else None
    if match is None:
        raise ValueError("is not an RFC 3339 date-time")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = match.group(7) or ".0"
    if not 1970 <= year <= 9999:
        raise ValueError("has a year outside 1970-9999")
    canonical = len(value) == 24 and value[10] == "T" and value[23] == "Z"
    if canonical and len(fraction) == 4 and second < 60:
        # Already our form (as servers that share our conventions write it): checked, kept.
        try:
            _dt.datetime(year, month, day, hour, minute, second)
        except ValueError:
            raise ValueError("is not a valid date-time") from None
        return value
    if match.group(8):
        offset = _dt.timedelta(0)
    else:
        sign = 1 if match.group(9) == "+" else -1
        off_h, off_m = int(match.group(10)), int(match.group(11))
        if off_h > 23 or off_m > 59:
            raise ValueError("has an invalid UTC offset")
        offset = sign * _dt.timedelta(hours=off_h, minutes=off_m)
    try:
        moment = _dt.datetime(
            year,
            month,
            day,
            hour,
            minute,
            min(second, 59),  # a leap second (60) is the last moment of its minute
            999_999 if second == 60 else int((fraction[1:] + "00000")[:6]),
            tzinfo=_dt.timezone(offset),
        )
        utc = moment.astimezone(_dt.timezone.utc)
    except (ValueError, OverflowError):
        raise ValueError("is not a valid date-time") from None
    if not 1970 <= utc.year <= 9999:
        raise ValueError("has a year outside 1970-9999 in UTC")
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
        f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"  # as model.rfc3339 writes them
    )


def _json_value_problem(value: Any, max_depth: int) -> str | None:
    """Why a JSON value cannot be kept (too deep, a number outside the double range, a lone
    surrogate in a string or a key), or None. Iterative: no recursion however deep."""
    if type(value) is dict and _flat_and_plain(value):
        return None  # the usual metadata, told in a fifth of the time
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                return f"nests deeper than {max_depth} levels"
            if isinstance(item, dict):
                for key, inner in item.items():
                    if not _utf8_clean(key):
                        return "holds a key with a lone surrogate"
                    stack.append((inner, depth + 1))
            else:
                stack.extend((inner, depth + 1) for inner in item)
        elif isinstance(item, str):
            if not _utf8_clean(item):
                return "holds a string with a lone surrogate"
        elif isinstance(item, bool) or item is None:
            pass
        elif isinstance(item, (int, float)):
            if not -_DOUBLE_MAX <= item <= _DOUBLE_MAX:  # also false for NaN
                return "holds a number outside the double range"
        else:
            return f"holds a {type(item).__name__}"
    return None


def _flat_and_plain(value: dict[Any, Any]) -> bool:
    """True for an object of ASCII keys and scalars (ASCII strings, doubles): surely keepable.
    False says nothing: the whole check decides."""
    for key, item in value.items():
        kind = type(item)
        if type(key) is not str or not key.isascii():
            return False
        if kind is str:
            if not item.isascii():
                return False
        elif kind is int or kind is float:
            if not -_DOUBLE_MAX <= item <= _DOUBLE_MAX:
                return False
        elif item is not None and kind is not bool:
            return False
    return True


class MultipartBody:
    """A multipart/form-data body (RFC 7578) of text fields and one file part, read by the HTTP
    layer in blocks as it sends: the file is never held in memory (requests' `files=` encodes
    the whole body first: 540 MiB of memory for a 256 MiB recording). `len` gives requests the
    Content-Length."""

    def __init__(
        self, fields: dict[str, str | None], name: str, filename: str, fh: BinaryIO
    ) -> None:
        boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = b"".join(  # a None field is left out, as requests' `data=` leaves it out
            _part_head(boundary, key) + str(value).encode("utf-8") + b"\r\n"
            for key, value in fields.items()
            if value is not None
        )
        head += _part_head(boundary, name, filename)
        tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        size = os.fstat(fh.fileno()).st_size - fh.tell()
        self.len = len(head) + size + len(tail)
        self._file = fh
        self._parts: list[BinaryIO] = [io.BytesIO(head), fh, io.BytesIO(tail)]
        self._left = size  # the file's part ends where its size said, even if it grows

    def read(self, n: int | None = -1) -> bytes:
        want = self.len if n is None or n < 0 else n
        out = []
        while want > 0 and self._parts:
            part = self._parts[0]
            is_file = part is self._file
            take = min(want, self._left) if is_file else want
            chunk = part.read(take) if take else b""
            if is_file:
                self._left -= len(chunk)
                if not chunk and self._left:
                    # Shorter than its size said (cut while sent): the body would not fill its
                    # Content-Length; the request fails and a later pass sends it again.
                    raise OSError("the audio file shrank while it was sent")
                done = self._left == 0
            else:
                done = not chunk
            if done:
                self._parts.pop(0)
            out.append(chunk)
            want -= len(chunk)
        return b"".join(out)


def _part_head(boundary: str, name: str, filename: str | None = None) -> bytes:
    # Quotes and line breaks in a name are escaped as browsers do (HTML5), as urllib3 does.
    def quoted(value: str) -> str:
        return value.translate({ord('"'): "%22", ord("\r"): "%0D", ord("\n"): "%0A"})

    disposition = f'form-data; name="{quoted(name)}"'
    lines = [f"--{boundary}"]
    if filename is None:
        lines.append(f"Content-Disposition: {disposition}")
    else:
        lines.append(f'Content-Disposition: {disposition}; filename="{quoted(filename)}"')
        lines.append("Content-Type: application/octet-stream")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def parse_server_job(obj: Any) -> ServerJob:  # noqa: C901 - one check per field of 6.4
    """Validate one job object of an answer (contract 6.4); raises InvalidJobObject.

    Timestamps kept are normalised to our RFC 3339 UTC `Z` form with four-digit years; a
    missing or null one is kept as None.
    """
    if not isinstance(obj, dict):
        raise InvalidJobObject(None, "it is not an object")
    sid = _usable_id(obj.get("id"))
    if sid is None:
        raise InvalidJobObject(None, "it has no usable id")

    def invalid(reason: str) -> InvalidJobObject:
        return InvalidJobObject(sid, reason)

    text = obj.get("text")
    text = "" if text is None else text
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS or not _utf8_clean(text):
        raise invalid("its text is not a storable string")
    metadata = obj.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise invalid("its metadata is not an object")
    problem = _json_value_problem(metadata, MAX_METADATA_DEPTH)
    if problem:
        raise invalid(f"its metadata {problem}")
    fields: dict[str, str | None] = {}
    for name in ("status", "local_id"):
        value = obj.get(name)
        if not (value is None or (isinstance(value, str) and _utf8_clean(value))):
            raise invalid(f"its {name} is not a string")
        fields[name] = value
    audio = _checked_audio(obj, sid)
    created_at, updated_at = _checked_times(obj, sid)
    return ServerJob(
        id=sid,
        local_id=fields["local_id"],
        text=text,
        metadata=metadata,
        status=fields["status"],
        audio=audio,
        created_at=created_at,
        updated_at=updated_at,
    )


def _checked_audio(obj: dict[str, Any], sid: str | None) -> dict[str, Any] | None:
    """The job object's audio (None or a JSON object we can keep); raises InvalidJobObject."""
    audio = obj.get("audio")
    if audio is not None:
        if not isinstance(audio, dict):
            raise InvalidJobObject(sid, "its audio is not an object")
        problem = _json_value_problem(audio, MAX_METADATA_DEPTH)
        if problem:
            raise InvalidJobObject(sid, f"its audio {problem}")
    return audio


def _checked_times(obj: dict[str, Any], sid: str | None) -> tuple[str | None, str | None]:
    """The job object's created_at and updated_at in our form (None when missing or null);
    raises InvalidJobObject."""
    times: list[str | None] = []
    for name in ("created_at", "updated_at"):
        value = obj.get(name)
        if value is None:
            times.append(None)
            continue
        if not isinstance(value, str):
            raise InvalidJobObject(sid, f"its {name} is not a string")
        try:
            times.append(_timestamp(value))
        except ValueError as exc:
            raise InvalidJobObject(sid, f"its {name} {exc}") from None
    return times[0], times[1]


def _server_job_or_invalid(obj: Any, parse: Callable[[Any], ServerJob]) -> Any:
    try:
        return parse(obj)
    except InvalidJobObject as exc:
        return _invalid_job(obj, exc)


def _invalid_job(obj: Any, exc: InvalidJobObject) -> InvalidJob:
    local_id = obj.get("local_id") if isinstance(obj, dict) else None
    usable = _usable_id(local_id) if isinstance(local_id, str) else None
    return InvalidJob(exc.server_id, usable, exc.reason)


class Remote:
    """One server. Methods raise the RemoteError kinds; `close()` ends the session."""

    def __init__(
        self,
        api_base: str,
        token: str | None = None,
        timeout: float = 10.0,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
        page_limit: int | None = None,
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self._api_path = urllib.parse.urlsplit(self.api_base).path  # for -vv lines: no host
        self.timeout = timeout
        self.page_limit = page_limit
        self.session = requests.Session()
        self.session.auth = BearerAuth(token)
        self._token = token or None
        # The token as a server may echo it: as sent, and percent-encoded in a URL it built.
        self._token_forms: list[str] = []
        if token:
            forms = {token, urllib.parse.quote(token, safe=""), urllib.parse.quote_plus(token)}
            self._token_forms = sorted(forms, key=len, reverse=True)
        self.session.headers["User-Agent"] = "jobsyncd"
        # The environment (proxies, no_proxy, CA bundle) is read once here: with trust_env,
        # requests re-reads all of os.environ on every request, a fifth of a push's client time.
        # ~/.netrc is never read (the token travels in BearerAuth).
        self.session.trust_env = False
        # Plain http never goes through an environment proxy: the token would cross in clear
        # text to a third host. https may (a CONNECT tunnel keeps it encrypted).
        if urllib.parse.urlsplit(self.api_base).scheme == "https":
            self.session.proxies = requests.utils.get_environ_proxies(self.api_base)
        if not verify_tls:
            self.session.verify = False
            import warnings

            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        else:
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            self.session.verify = bundle or True
        # No retries inside urllib3: the pass decides what is retried, and when.
        adapter: requests.adapters.HTTPAdapter
        if verify_tls and ca_bundle:
            adapter = _ExtraCAAdapter(_context_with_extra_ca(bundle, ca_bundle))
            self.session.verify = True
        else:
            adapter = _Adapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def uploader(
        self, chunk_bytes: int, progress: Callable[[int, int], None] | None = None
    ) -> Uploader:
        """The tus client of this server's `/uploads`, sending through this session."""
        from .upload import Uploader  # upload.py imports this module: imported when used

        return Uploader(self, chunk_bytes, progress)

    # ---- the token never leaves in server text --------------------------------------------
    def _redact(self, text: str) -> str:
        for form in self._token_forms:
            text = text.replace(form, "***")
        return text

    @contextlib.contextmanager
    def _redacting(self) -> Iterator[None]:
        """Every error leaving the API methods has the token replaced by `***` in its text: a
        hostile server may echo the Authorization header into its error, a redirect's Location,
        a content type or a job id, and that text is shown, logged and stored (contract 3)."""
        try:
            yield
        except RemoteError as exc:
            raise self._redact_error(exc)  # noqa: B904 - the same exception, its text redacted

    def _redact_error(self, exc: RemoteError) -> RemoteError:
        """`exc` with the token replaced in its text (also for errors returned, not raised)."""
        exc.args = tuple(self._redact(a) if isinstance(a, str) else a for a in exc.args)
        if isinstance(exc, InvalidJobObject):
            exc.reason = self._redact(exc.reason)
        return exc

    # ---- transport ------------------------------------------------------------------------
    def _send(
        self,
        method: str,
        path: str,
        *,
        max_bytes: int = MAX_JOB_ANSWER_BYTES,
        answer_limit: float | None = None,
        **kwargs: Any,
    ) -> tuple[requests.Response, bytes]:
        """One request and its whole answer. `answer_limit` (default 3x the timeout) bounds the
        answer from the end of sending to its last byte, enforced at the socket."""
        limit = 3 * self.timeout if answer_limit is None else answer_limit
        flight = RequestInFlight(limit)
        _reaper.begin(flight)
        _current.flight = flight
        status = "failed"
        try:
            # A long-poll's answer may rightly be silent for its whole limit: no read times out first.
            read_timeout = self.timeout if answer_limit is None else max(self.timeout, limit)
            response, body = self._send_and_read(method, path, max_bytes, read_timeout, **kwargs)
            if flight.expired:  # the reaper cut it: what was read is not the whole answer
                raise self._too_slow(method, path, limit)
            status = str(response.status_code)
            return response, body
        except RemoteError as exc:
            if flight.expired:
                raise self._too_slow(method, path, limit) from None
            status = f"failed ({type(exc).__name__})"
            raise
        finally:
            _current.flight = None
            _reaper.end(flight)
            took = (time.monotonic() - flight.started) * 1000
            log.debug(self._redact(f"{method} {self._api_path}{path} {status} {took:.0f} ms"))

    def _too_slow(self, method: str, path: str, limit: float) -> Transient:
        return Transient(f"{method} {path}: the answer took longer than {limit:g} s (read timeout)")

    def _send_and_read(
        self, method: str, path: str, max_bytes: int, read_timeout: float, **kwargs: Any
    ) -> tuple[requests.Response, bytes]:
        try:
            response = self.session.request(
                method,
                self.api_base + path,
                timeout=(self.timeout, read_timeout),
                allow_redirects=False,
                stream=True,
                **kwargs,
            )
        except requests.exceptions.SSLError as exc:
            raise TLSFailure(f"TLS failure talking to {self.api_base}: {_reason(exc)}") from None
        except requests.exceptions.ConnectTimeout:
            raise Offline(f"cannot reach {self.api_base}: connect timed out") from None
        except requests.exceptions.ReadTimeout:
            raise Transient(f"{method} {path}: the server did not answer in time") from None
        except requests.exceptions.ConnectionError as exc:
            if _is_connect_failure(exc):
                raise Offline(f"cannot reach {self.api_base}: {_reason(exc)}") from None
            raise Transient(f"{method} {path}: connection broken: {_reason(exc)}") from None
        except requests.exceptions.RequestException as exc:
            raise Transient(f"{method} {path}: {_reason(exc)}") from None
        except (ValueError, http.client.HTTPException) as exc:
            # http.client's own checks: their text may quote a header (the token): not shown.
            raise Transient(
                f"{method} {path}: the request could not be sent ({type(exc).__name__})"
            ) from None
        try:
            body = self._read_body(response, max_bytes, method, path)
        finally:
            response.close()
        return response, body

    def _read_body(
        self, response: requests.Response, max_bytes: int, method: str, path: str
    ) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise AnswerTooLarge(f"{method} {path}: the answer is too large ({declared} bytes)")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    # Not AnswerTooLarge: an answer that never ends is no reason to ask again.
                    raise Transient(f"{method} {path}: the answer is larger than {max_bytes} bytes")
                chunks.append(chunk)
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if isinstance(
                exc, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError)
            ):
                raise Transient(f"{method} {path}: the server did not answer in time") from None
            raise Transient(f"{method} {path}: connection broken: {_reason(exc)}") from None
        return b"".join(chunks)

    def _check_status(
        self, response: requests.Response, body: bytes, method: str, path: str
    ) -> None:
        status = response.status_code
        if status in (401, 403):
            raise AuthRefused(status)
        if status in (429, 503):
            raise BackOff(status, parse_retry_after(response.headers.get("Retry-After")))
        if status == 404:
            raise Gone(f"{method} {path}: not found on the server (404)")
        if status >= 500:
            raise Transient(f"{method} {path}: server error {status}{_server_message(body)}")
        if 300 <= status < 400:
            where = response.headers.get("Location", "?")
            # Not the JSON answer expected (a captive portal, a moved server): an error that is
            # retried, never followed, with the place named so that server_url can be fixed.
            raise Transient(
                f"{method} {path}: the server redirects to {where[:200]} (status {status}); "
                "redirects are not followed: check server_url"
            )
        if status >= 400:
            raise Permanent(
                f"{method} {path}: refused by the server ({status}){_server_message(body)}"
            )

    def _json(self, response: requests.Response, body: bytes, method: str, path: str) -> Any:
        ctype = response.headers.get("Content-Type", "")
        if "json" not in ctype.lower():
            raise Transient(
                f"{method} {path}: the server answered {ctype or 'no content type'}, not JSON"
            )
        try:
            # NaN/Infinity literals are junk; 1e999 decodes to inf and an integer too long for
            # int() to inf, both then refused in the job that holds them (parse_server_job).
            return json.loads(body, parse_constant=_refuse_constant, parse_int=_parse_int)
        except (ValueError, RecursionError):
            raise Transient(f"{method} {path}: the server answered junk, not JSON") from None

    def _job(self, obj: Any) -> ServerJob:
        job = parse_server_job(obj)
        if self._token and self._token in job.id:
            # It would be shown, logged and stored: never (contract 3).
            raise InvalidJobObject(None, "its id holds the access token")
        return job

    def _job_call(self, method: str, path: str, ok: tuple[int, ...], **kwargs: Any) -> ServerJob:
        response, body = self._send(method, path, **kwargs)
        self._check_status(response, body, method, path)
        if response.status_code not in ok:
            raise Transient(f"{method} {path}: unexpected answer {response.status_code}")
        return self._job(self._json(response, body, method, path))

    # ---- the API ----------------------------------------------------------------------------
    def create(
        self,
        local_id: str,
        text: str,
        metadata: dict[str, Any],
        audio_path: str | None,
        upload: tuple[str, str] | None = None,
    ) -> ServerJob:
        """POST the job; raises InvalidJobObject (a Transient) when the answer's job is not
        valid, with the id it holds when usable. `upload`: (id, filename) of a finished
        resumable upload to attach instead of sending the audio (contract 6.8)."""
        with self._redacting():
            if audio_path is None:
                payload = {"local_id": local_id, "text": text, "metadata": metadata}
                if upload is not None:
                    payload["audio_upload"], payload["audio_filename"] = upload
                return self._job_call("POST", "/jobs", (200, 201), json=payload)
            fields = {"local_id": local_id, "text": text, "metadata": json.dumps(metadata)}
            return self._with_audio("POST", "/jobs", (200, 201), fields, audio_path)

    def update(
        self,
        server_id: str,
        fields: dict[str, Any],
        audio_path: str | None,
        upload: tuple[str, str] | None = None,
    ) -> ServerJob:
        path = "/jobs/" + _quote(server_id)
        with self._redacting():
            if audio_path is None:
                if upload is not None:
                    fields = {**fields, "audio_upload": upload[0], "audio_filename": upload[1]}
                return self._job_call("PATCH", path, (200,), json=fields)
            form = {k: json.dumps(v) if k == "metadata" else v for k, v in fields.items()}
            return self._with_audio("PATCH", path, (200,), form, audio_path)

    def _with_audio(
        self, method: str, path: str, ok: tuple[int, ...], fields: dict[str, Any], audio_path: str
    ) -> ServerJob:
        try:
            fh = open(audio_path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise Permanent(
                f"cannot read the job's audio copy {audio_path}: {exc.strerror}"
            ) from None
        try:
            body = MultipartBody(fields, "audio", os.path.basename(audio_path), fh)
            return self._job_call(
                method, path, ok, data=body, headers={"Content-Type": body.content_type}
            )
        finally:
            fh.close()

    def delete(self, server_id: str) -> None:
        """Delete on the server; 404 counts as done, and so does a 204, or a 200 or 202 whose
        body is empty or JSON."""
        path = "/jobs/" + _quote(server_id)
        with self._redacting():
            response, body = self._send("DELETE", path)
            if response.status_code == 404:
                return
            self._check_status(response, body, "DELETE", path)
            if response.status_code not in (200, 202, 204):
                raise Transient(f"DELETE {path}: unexpected answer {response.status_code}")
            if response.status_code != 204 and body.strip():
                # A 200 with a body must be the job server's JSON: a captive portal or a proxy
                # answers 200 text/html, and taking that as done would drop the job here while
                # the server keeps it, never to be seen again.
                self._json(response, body, "DELETE", path)

    def get(self, server_id: str) -> ServerJob:
        path = "/jobs/" + _quote(server_id)
        with self._redacting():
            return self._job_call("GET", path, (200,))

    def list_pages(
        self, etag: str | None
    ) -> Iterator[tuple[list[ServerJob | InvalidJob], str | None]]:
        """Yield (the jobs of a page, the listing's ETag) page by page; NotModified on a 304.

        An invalid job object is yielded as an InvalidJob, the rest of its page as ServerJobs.
        The listing is bounded (contract 6.4): after the first page, three pages in a row that
        bring no job not seen yet in this listing, or a cursor seen before, raise Transient.
        """
        with self._redacting():
            yield from self._list_pages(etag)

    def _list_pages(  # noqa: C901 - the listing's bounds (6.4), each a line
        self, etag: str | None
    ) -> Iterator[tuple[list[ServerJob | InvalidJob], str | None]]:
        cursor: str | None = None
        first = True
        listing_etag: str | None = None
        seen_ids = _SeenIds()
        seen_cursors: set[bytes] = set()  # digests: a page's cost, not a cursor's size
        pages_without_news = 0
        while True:
            params: dict[str, Any] = {}
            if self.page_limit:
                params["limit"] = self.page_limit
            if cursor is not None:
                params["cursor"] = cursor
            headers = {"If-None-Match": etag} if (first and etag) else {}
            response, body = self._send(
                "GET", "/jobs", params=params, headers=headers, max_bytes=MAX_PAGE_ANSWER_BYTES
            )
            if response.status_code == 304 and first and etag:
                raise NotModified()
            self._check_status(response, body, "GET", "/jobs")
            if response.status_code != 200:
                raise Transient(f"GET /jobs: unexpected answer {response.status_code}")
            if first:
                listing_etag = response.headers.get("ETag")
            page = self._json(response, body, "GET", "/jobs")
            if not isinstance(page, dict) or not isinstance(page.get("jobs"), list):
                raise Transient("GET /jobs: the server answered junk, not a listing")
            items: list[ServerJob | InvalidJob] = []
            news = False
            for obj in page["jobs"]:
                try:
                    job: ServerJob | InvalidJob = self._job(obj)
                except InvalidJobObject as exc:
                    job = _invalid_job(obj, exc)
                if job.id is not None and seen_ids.add(job.id):
                    news = True
                items.append(job)
            yield items, listing_etag
            cursor = page.get("next_cursor")
            if cursor is None:
                return
            if not isinstance(cursor, str) or len(cursor) > 4096:
                raise Transient("GET /jobs: the server answered a bad cursor")
            if not first:
                pages_without_news = 0 if news else pages_without_news + 1
                if pages_without_news >= 3:
                    raise Transient(
                        "GET /jobs: three pages in a row brought no job not listed yet; "
                        "the listing does not end"
                    )
            digest = hashlib.blake2b(
                cursor.encode("utf-8", "surrogatepass"), digest_size=16
            ).digest()
            if digest in seen_cursors:
                raise Transient("GET /jobs: the server answered a cursor it gave before")
            seen_cursors.add(digest)
            first = False


    def changes(
        self, since: str | None, limit: int, wait: float = 0, held: HeldTest | None = None
    ) -> FeedPage:
        """One answer of the change feed (contract 6.7): FeedNotOffered on 404/405, FeedGone
        on 410 (with its reason), the RemoteError kinds otherwise."""
        if held is not None and self._token:
            token, test = self._token, held

            def held(obj: dict[str, Any]) -> bool:  # an id holding the token is never kept
                return test(obj) and token not in obj["id"]

        with self._redacting():
            page = self._changes(since, limit, wait, held)
        for i, item in enumerate(page.items):
            if isinstance(item, InvalidJob):
                page.items[i] = replace(item, reason=self._redact(item.reason))
        return page

    def _changes(
        self, since: str | None, limit: int, wait: float, held: HeldTest | None
    ) -> FeedPage:
        params: dict[str, Any] = {"limit": limit}
        if since is not None:
            params["since"] = since
        if wait:
            params["wait"] = f"{wait:g}"
        # A long-poll may stay silent for `wait` seconds: its whole-answer limit is
        # wait + request_timeout_seconds (contract section 5).
        response, body = self._send(
            "GET",
            "/changes",
            params=params,
            max_bytes=MAX_PAGE_ANSWER_BYTES,
            answer_limit=(wait + self.timeout) if wait else None,
        )
        status = response.status_code
        if status in (404, 405):
            raise FeedNotOffered()
        if status == 410:
            try:
                reason = json.loads(body).get("reason")
            except (ValueError, AttributeError, RecursionError):
                reason = None
            raise FeedGone(reason if isinstance(reason, str) else "diverged")
        self._check_status(response, body, "GET", "/changes")
        if status != 200:
            raise Transient(f"GET /changes: unexpected answer {status}")
        try:
            page = self._json(response, body, "GET", "/changes")
        except Transient as exc:
            raise NotAFeed(str(exc)) from None
        if (
            not isinstance(page, dict)
            or not isinstance(page.get("changes"), list)
            or not isinstance(page.get("next"), str)
            or not page["next"]
            or len(page["next"]) > 4096
            or not isinstance(page.get("more"), bool)
        ):
            raise NotAFeed("GET /changes: the server answered junk, not a page of changes")
        items = [_feed_item(c, self._job, held) for c in page["changes"]]
        return FeedPage(items, page["next"], page["more"])


    def batch(self, operations: list[tuple[str, bytes]]) -> list[Any]:
        """POST /batch (contract 6.3 "Batches"): `operations` are (kind, the operation as JSON),
        encoded once by the caller (who splits batches by their size). Per operation, the
        answer its own request would have given: a ServerJob (create, update), None (delete
        done), or the RemoteError to raise for that job. Only the batch's own status stops the
        pass (AuthRefused, BackOff, Offline, TLSFailure raised here); a 5xx, a timeout or a
        broken connection for the whole batch raises Transient (an error for each of its jobs).
        The same as batch_answers(operations, batch_results(operations))."""
        return list(self.batch_answers(operations, self.batch_results(operations)))

    def batch_results(self, operations: list[tuple[str, bytes]]) -> list[Any]:
        """The request of batch(), raising as it does: the server's results, not yet read as
        answers (batch_answers), so that reading them can wait for the next batch's request."""
        with self._redacting():
            return self._batch(operations)

    def batch_answers(
        self, operations: list[tuple[str, bytes]], results: list[Any]
    ) -> Iterator[Any]:
        """The answer for each operation (as batch() gives them) from its result; an operation
        left without a result is an error for its job."""
        for i, (kind, _) in enumerate(operations):
            if i >= len(results):
                answer = Transient("POST /batch: the server gave no result for this operation")
            else:
                answer = _batch_answer(kind, results[i], self._job)
            yield self._redact_error(answer) if isinstance(answer, RemoteError) else answer

    def _batch(self, operations: list[tuple[str, bytes]]) -> list[Any]:
        body = b'{"operations":[' + b",".join(op for _, op in operations) + b"]}"
        response, answer_body = self._send(
            "POST",
            "/batch",
            data=body,
            headers={"Content-Type": "application/json"},
            max_bytes=MAX_PAGE_ANSWER_BYTES,
        )
        del body
        status = response.status_code
        if status in (404, 405):
            raise BatchNotOffered()
        if status == 413:
            raise BatchTooLarge()
        self._check_status(response, answer_body, "POST", "/batch")
        if status != 200:
            raise Transient(f"POST /batch: unexpected answer {status}")
        answer = self._json(response, answer_body, "POST", "/batch")
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list):
            raise Transient("POST /batch: the server answered junk, not a list of results")
        return results


def _batch_answer(kind: str, result: Any, parse: Callable[[Any], ServerJob]) -> Any:
    what = f"POST /batch ({kind})"
    status = result.get("status") if isinstance(result, dict) else None
    if not isinstance(status, int) or isinstance(status, bool):
        return Transient(f"{what}: the server answered junk for this operation")
    error = result.get("error")
    message = _server_message(json.dumps({"error": error}).encode()) if error else ""
    if kind == "delete" and status in (200, 202, 204, 404):
        return None  # 404 counts as done, as for a DELETE of its own
    if status in ((200, 201) if kind == "create" else (200,)) and kind != "delete":
        try:
            return parse(result.get("job"))
        except RemoteError as exc:
            return exc
    if status == 404:
        return Gone(f"{what}: not found on the server (404)")
    if status in (401, 403, 429, 503) or status >= 500:
        # Per operation these are errors for its job; only the batch's own status stops a pass.
        return Transient(f"{what}: the server answered {status}{message}")
    if status >= 400:
        return Permanent(f"{what}: refused by the server ({status}){message}")
    return Transient(f"{what}: unexpected answer {status}")


def _feed_item(obj: Any, parse: Callable[[Any], ServerJob], held: HeldTest | None = None) -> Any:
    """A tombstone, a ServerJob, an InvalidJob (skipped by the pass with a warning), or
    Unchanged (`held` says the agent holds it as it is)."""
    if isinstance(obj, dict):
        if obj.get("deleted") is True:
            sid = _usable_id(obj.get("id"))
            local_id = obj.get("local_id")
            if sid is not None:
                return Tombstone(sid, _usable_id(local_id) if isinstance(local_id, str) else None)
        elif held is not None:
            same = unchanged_item(obj, held)
            if same is not None:
                return same
    return _server_job_or_invalid(obj, parse)


def unchanged_item(obj: dict[str, Any], held: HeldTest) -> Unchanged | None:
    """Unchanged for a job object that `held` says the agent holds as it is (its id, local_id,
    text, metadata and status are the held job's, so they are valid: they were checked when
    they came) and whose other fields are valid too (an invalid one is skipped with its
    warning as ever, 6.4); else None. A pass reading back the jobs it just pushed (a first
    sync: all of them) checks each in a fraction of a full parse."""
    if not held(obj):
        return None
    try:
        _checked_audio(obj, None)
        _checked_times(obj, None)
    except InvalidJobObject:
        return None  # parsed in full, and skipped with its warning
    return Unchanged(obj["id"])


class _SeenIds:
    """The ids seen in one listing, as a Bloom filter of fixed size (1 MiB whatever the
    listing's size; Bloom 1970). A false positive only takes a new job for a seen one, which
    ends a listing only if it happens to every job of three pages in a row."""

    BITS = 1 << 23

    def __init__(self) -> None:
        self._bits = bytearray(self.BITS >> 3)

    def add(self, key: str) -> bool:
        """Add `key`; True when it was surely not there before."""
        h = hash(key)  # 64 bits of SipHash, cached on the string
        new = False
        for shift in (0, 20, 40):
            position = (h >> shift) & (self.BITS - 1)
            byte, bit = position >> 3, 1 << (position & 7)
            if not self._bits[byte] & bit:
                self._bits[byte] |= bit
                new = True
        return new


class _DeadlineMixin:
    sock: Any

    def getresponse(self) -> Any:
        flight = getattr(_current, "flight", None)
        if flight is not None:
            flight.answer_begins(self.sock)  # the request is sent: the whole-answer limit runs
        return super().getresponse()  # type: ignore[misc]


class _DeadlineConnection(_DeadlineMixin, urllib3.connection.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineMixin, urllib3.connection.HTTPSConnection):
    pass


class _DeadlineHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _DeadlineConnection


class _DeadlineHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_POOL_CLASSES = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}


class _Adapter(requests.adapters.HTTPAdapter):
    """No retries inside urllib3 (the pass decides what is retried, and when); connections
    whose answers are bound by the whole-answer limit, through a proxy too."""

    def __init__(self) -> None:
        super().__init__(max_retries=0, pool_connections=1, pool_maxsize=2)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager


class _ExtraCAAdapter(_Adapter):
    """Verifies with the default CAs *and* the configured `ca_bundle` (an extra CA file, not a
    replacement: requests' own `verify=path` would drop the default CAs)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        super().__init__()

    def build_connection_pool_key_attributes(
        self, request: Any, verify: Any, cert: Any = None
    ) -> Any:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        if verify is not False:
            pool_kwargs["ssl_context"] = self._context
        return host_params, pool_kwargs


def _context_with_extra_ca(default_bundle: str | None, extra: str) -> Any:
    import ssl

    from requests.utils import DEFAULT_CA_BUNDLE_PATH

    context = ssl.create_default_context(cafile=default_bundle or DEFAULT_CA_BUNDLE_PATH)
    try:
        context.load_verify_locations(cafile=extra)
    except (OSError, ssl.SSLError) as exc:
        from .errors import ConfigError

        raise ConfigError(f"cannot use ca_bundle {extra}: {exc}") from None
    return context


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (a server that stored 1e999 may serve them): decoded as a
    # NaN, which makes only the job holding it invalid (skipped), never the rest of the page,
    # and never reaches our own output.
    return float("nan")


def _parse_int(digits: str) -> int | float:
    # int() refuses more than 4300 digits (a ValueError failing the whole answer); anything
    # this long is outside the double range anyway.
    return int(digits) if len(digits) <= 400 else float("inf")


def _quote(server_id: str) -> str:
    from urllib.parse import quote

    return quote(server_id, safe="")


def _server_message(body: bytes) -> str:
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(message, str):
        return ""
    message = " ".join(message.split())[:300]
    return f": {message}" if message else ""


def _is_connect_failure(exc: BaseException) -> bool:
    """True when the connection was never made (refused, DNS, unreachable): we are offline."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.NameResolutionError)
        ):
            return True
        if isinstance(current, (ConnectionRefusedError,)):
            return True
        if isinstance(current, urllib3.exceptions.MaxRetryError) and current.reason is not None:
            current = current.reason
            continue
        nxt = current.__cause__ or current.__context__
        if nxt is None and current.args and isinstance(current.args[0], BaseException):
            nxt = current.args[0]
        current = nxt
    return False


def _reason(exc: BaseException) -> str:
    """A short reason without URLs' query strings or headers (never the token)."""
    inner: BaseException = exc
    for _ in range(5):
        if isinstance(inner, urllib3.exceptions.MaxRetryError) and inner.reason is not None:
            inner = inner.reason
        elif inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        else:
            break
    text = str(inner) or type(inner).__name__
    # urllib3 says "HTTPConnection(host=..., port=...): Failed to establish a new connection:
    # [Errno 111] Connection refused": keep the part a person needs.
    text = re.sub(r"^\w*Connection(Pool)?\(host=[^)]*\): ", "", text)
    text = re.sub(r"^Failed to establish a new connection: (\[Errno -?\d+\] )?", "", text)
    return " ".join(text.split())[:300]
