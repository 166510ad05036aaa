"""The HTTP client of the job API (contract section 7), on one keep-alive requests.Session.

Every failure is turned into one of a few kinds the sync pass sorts on: Offline, TLSFailure,
AuthRefused, BackOff(retry_after), Transient, Permanent(message), Gone. Answers are bounded in
size and in time (a whole answer within 3x the read timeout); redirects are never followed; the
token travels in an AuthBase so that requests never swaps it for ~/.netrc credentials.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests  # costs ~80 ms of start-up: only the commands that talk to a server import us
import requests.adapters
import requests.auth
import requests.utils
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions

from . import log

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
        if seconds != seconds:  # NaN
            seconds = BACKOFF_DEFAULT
    return min(max(seconds, BACKOFF_MIN), BACKOFF_MAX)


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


def _timestamp_or_none(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    from .model import parse_rfc3339, rfc3339

    try:
        moment = parse_rfc3339(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return rfc3339(moment)  # stored as our own RFC 3339 UTC form, ending in Z


def parse_server_job(obj: Any) -> ServerJob:
    """Validate one job of an answer; a hostile or broken one raises Transient (junk)."""
    if not isinstance(obj, dict):
        raise Transient("the server answered junk: a job that is not an object")
    sid = obj.get("id")
    if isinstance(sid, int) and not isinstance(sid, bool):
        sid = str(sid)
    if not isinstance(sid, str) or not sid or len(sid) > 256 or any(c in sid for c in "\n\r\x00"):
        raise Transient("the server answered junk: a job without a usable id")
    text = obj.get("text")
    if text is None:
        text = ""
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    status = obj.get("status")
    local_id = obj.get("local_id")
    audio = obj.get("audio")
    if (
        not isinstance(text, str)
        or len(text) > MAX_TEXT_CHARS
        or not isinstance(metadata, dict)
        or not (status is None or isinstance(status, str))
        or not (local_id is None or isinstance(local_id, str))
        or not (audio is None or isinstance(audio, dict))
    ):
        raise Transient(f"the server answered junk for job {sid[:64]!r}")
    try:
        # Lone surrogates (a "\ud800" escape) cannot be stored as UTF-8: junk, not a crash later.
        json.dumps([sid, text, metadata, status, local_id], ensure_ascii=False).encode()
    except (UnicodeEncodeError, ValueError, RecursionError):
        raise Transient(f"the server answered junk for job {sid[:64]!r}") from None
    return ServerJob(
        id=sid,
        local_id=local_id,
        text=text,
        metadata=metadata,
        status=status,
        audio=audio,
        created_at=_timestamp_or_none(obj.get("created_at")),
        updated_at=_timestamp_or_none(obj.get("updated_at")),
    )


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
        self.session.headers["User-Agent"] = "jobsyncd"
        # The environment (proxies, no_proxy, CA bundle) is read once here: with trust_env,
        # requests re-reads all of os.environ on every request, a fifth of a push's client time.
        # ~/.netrc is never read (the token travels in BearerAuth).
        self.session.trust_env = False
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

    # ---- transport ------------------------------------------------------------------------
    def _send(
        self,
        method: str,
        path: str,
        *,
        max_bytes: int = MAX_JOB_ANSWER_BYTES,
        **kwargs: Any,
    ) -> tuple[requests.Response, bytes]:
        limit = 3 * self.timeout
        flight = RequestInFlight(limit)
        _reaper.begin(flight)
        _current.flight = flight
        status = "failed"
        try:
            response, body = self._send_and_read(method, path, max_bytes, **kwargs)
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
            log.debug(f"{method} {self._api_path}{path} {status} {took:.0f} ms")

    def _too_slow(self, method: str, path: str, limit: float) -> Transient:
        return Transient(f"{method} {path}: the answer took longer than {limit:g} s (read timeout)")

    def _send_and_read(
        self, method: str, path: str, max_bytes: int, **kwargs: Any
    ) -> tuple[requests.Response, bytes]:
        try:
            response = self.session.request(
                method,
                self.api_base + path,
                timeout=(self.timeout, self.timeout),
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
            raise Transient(f"{method} {path}: the answer is too large ({declared} bytes)")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(1 << 16):
                size += len(chunk)
                if size > max_bytes:
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
        if 500 <= status:
            raise Transient(f"{method} {path}: server error {status}{_server_message(body)}")
        if 300 <= status < 400:
            where = response.headers.get("Location", "?")
            # Not the JSON answer expected (a captive portal, a moved server): an error that is
            # retried, never followed, with the place named so that server_url can be fixed.
            raise Transient(
                f"{method} {path}: the server redirects to {where[:200]} (status {status}); "
                "redirects are not followed: check server_url"
            )
        if 400 <= status:
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
            return json.loads(body, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            raise Transient(f"{method} {path}: the server answered junk, not JSON") from None

    def _job_call(self, method: str, path: str, ok: tuple[int, ...], **kwargs: Any) -> ServerJob:
        response, body = self._send(method, path, **kwargs)
        self._check_status(response, body, method, path)
        if response.status_code not in ok:
            raise Transient(f"{method} {path}: unexpected answer {response.status_code}")
        return parse_server_job(self._json(response, body, method, path))

    # ---- the API ----------------------------------------------------------------------------
    def create(
        self, local_id: str, text: str, metadata: dict[str, Any], audio_path: str | None
    ) -> ServerJob:
        if audio_path is None:
            payload = {"local_id": local_id, "text": text, "metadata": metadata}
            return self._job_call("POST", "/jobs", (200, 201), json=payload)
        fields = {"local_id": local_id, "text": text, "metadata": json.dumps(metadata)}
        return self._with_audio("POST", "/jobs", (200, 201), fields, audio_path)

    def update(self, server_id: str, fields: dict[str, Any], audio_path: str | None) -> ServerJob:
        path = "/jobs/" + _quote(server_id)
        if audio_path is None:
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
            name = os.path.basename(audio_path)
            return self._job_call(
                method,
                path,
                ok,
                data=fields,
                files={"audio": (name, fh, "application/octet-stream")},
            )
        finally:
            fh.close()

    def delete(self, server_id: str) -> None:
        """Delete on the server; 404 counts as done."""
        path = "/jobs/" + _quote(server_id)
        response, body = self._send("DELETE", path)
        if response.status_code == 404:
            return
        self._check_status(response, body, "DELETE", path)
        if response.status_code not in (200, 202, 204):
            raise Transient(f"DELETE {path}: unexpected answer {response.status_code}")

    def get(self, server_id: str) -> ServerJob:
        path = "/jobs/" + _quote(server_id)
        return self._job_call("GET", path, (200,))

    def list_pages(self, etag: str | None) -> Iterator[tuple[list[ServerJob], str | None]]:
        """Yield (jobs of a page, the listing's ETag) page by page; NotModified on a 304."""
        cursor: str | None = None
        first = True
        listing_etag: str | None = None
        seen_cursors: set[str] = set()
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
            jobs = [parse_server_job(j) for j in page["jobs"]]
            yield jobs, listing_etag
            cursor = page.get("next_cursor")
            if cursor is None:
                return
            if (
                not isinstance(cursor, str)
                or cursor in seen_cursors
                or len(seen_cursors) > 1_000_000
            ):
                raise Transient("GET /jobs: the server answered a bad or repeated cursor")
            seen_cursors.add(cursor)
            first = False


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
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity would make our own output invalid


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
