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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests  # costs ~80 ms of start-up: only the commands that talk to a server import us
import requests.adapters
import requests.auth
import requests.utils
import urllib3.exceptions

from .api import BatchNotOffered, BatchTooLarge, FeedGone, FeedNotOffered, FeedPage, Tombstone

MAX_JOB_ANSWER_BYTES = 4 << 20
MAX_PAGE_ANSWER_BYTES = 64 << 20  # a page of 500 jobs is well under 1 MiB in practice
MAX_TEXT_CHARS = 16 << 20
BACKOFF_DEFAULT = 30.0
BACKOFF_MIN, BACKOFF_MAX = 1.0, 3600.0


_in_flight = 0  # requests under way in this process (the daemon's watchdog reads it)


def requests_in_flight() -> int:
    """How many requests are under way: each is bounded by its socket timeouts, so a pass
    inside one is waiting on the network, not stuck."""
    return _in_flight


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


def _server_job_or_invalid(obj: Any) -> Any:
    try:
        return parse_server_job(obj)
    except Transient as exc:
        sid = obj.get("id") if isinstance(obj, dict) else None
        return _Invalid(sid if isinstance(sid, str) else None, str(exc))


@dataclass(frozen=True)
class _Invalid:
    """Stand-in for an invalid job object until the HTTP layer's InvalidJob lands."""

    id: str | None
    reason: str


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
            adapter = requests.adapters.HTTPAdapter(
                max_retries=0, pool_connections=1, pool_maxsize=2
            )
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
        url = self.api_base + path
        global _in_flight
        _in_flight += 1
        try:
            return self._send_and_read(method, path, url, max_bytes, **kwargs)
        finally:
            _in_flight -= 1

    def _send_and_read(
        self, method: str, path: str, url: str, max_bytes: int, **kwargs: Any
    ) -> tuple[requests.Response, bytes]:
        try:
            response = self.session.request(
                method,
                url,
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
        deadline = time.monotonic() + 3 * self.timeout
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
                if time.monotonic() > deadline:
                    raise Transient(
                        f"{method} {path}: the answer took longer than {3 * self.timeout:g} s"
                    )
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


    def changes(self, since: str | None, limit: int, wait: float = 0) -> FeedPage:
        """One answer of the change feed (contract 6.7): FeedNotOffered on 404/405, FeedGone
        on 410 (with its reason), the RemoteError kinds otherwise."""
        params: dict[str, Any] = {"limit": limit}
        if since is not None:
            params["since"] = since
        if wait:
            params["wait"] = f"{wait:g}"
        response, body = self._send("GET", "/changes", params=params, max_bytes=MAX_PAGE_ANSWER_BYTES)
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
        page = self._json(response, body, "GET", "/changes")
        if (
            not isinstance(page, dict)
            or not isinstance(page.get("changes"), list)
            or not isinstance(page.get("next"), str)
            or not page["next"]
            or len(page["next"]) > 4096
            or not isinstance(page.get("more"), bool)
        ):
            raise Transient("GET /changes: the server answered junk, not a page of changes")
        return FeedPage([_feed_item(c) for c in page["changes"]], page["next"], page["more"])


    def batch(self, operations: list[dict[str, Any]]) -> list[Any]:
        """POST /batch (contract 6.3 "Batches"): per operation, the answer its own request would
        have given: a ServerJob (create, update), None (delete done), or the RemoteError to
        raise for that job. Only the batch's own status stops the pass (AuthRefused, BackOff,
        Offline, TLSFailure raised here); a 5xx, a timeout or a broken connection for the whole
        batch raises Transient (an error for each of its jobs)."""
        response, body = self._send(
            "POST", "/batch", json={"operations": operations}, max_bytes=MAX_PAGE_ANSWER_BYTES
        )
        status = response.status_code
        if status in (404, 405):
            raise BatchNotOffered()
        if status == 413:
            raise BatchTooLarge()
        self._check_status(response, body, "POST", "/batch")
        if status != 200:
            raise Transient(f"POST /batch: unexpected answer {status}")
        answer = self._json(response, body, "POST", "/batch")
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list):
            raise Transient("POST /batch: the server answered junk, not a list of results")
        out: list[Any] = []
        for i, op in enumerate(operations):
            if i >= len(results):
                out.append(Transient("POST /batch: the server gave no result for this operation"))
            else:
                out.append(_batch_answer(op, results[i]))
        return out


def _batch_answer(op: dict[str, Any], result: Any) -> Any:
    kind = op.get("op")
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
            return parse_server_job(result.get("job"))
        except RemoteError as exc:
            return exc
    if status == 404:
        return Gone(f"{what}: not found on the server (404)")
    if status in (401, 403, 429, 503) or status >= 500:
        # Per operation these are errors for its job; only the batch's own status stops a pass.
        return Transient(f"{what}: the server answered {status}{message}")
    if 400 <= status:
        return Permanent(f"{what}: refused by the server ({status}){message}")
    return Transient(f"{what}: unexpected answer {status}")


def _feed_item(obj: Any) -> Any:
    """A tombstone, a ServerJob, or an InvalidJob (skipped by the pass with a warning)."""
    if isinstance(obj, dict) and obj.get("deleted") is True:
        sid = obj.get("id")
        if isinstance(sid, int) and not isinstance(sid, bool):
            sid = str(sid)
        local_id = obj.get("local_id")
        if isinstance(sid, str) and sid and len(sid) <= 256:
            return Tombstone(sid, local_id if isinstance(local_id, str) else None)
    return _server_job_or_invalid(obj)


class _ExtraCAAdapter(requests.adapters.HTTPAdapter):
    """Verifies with the default CAs *and* the configured `ca_bundle` (an extra CA file, not a
    replacement: requests' own `verify=path` would drop the default CAs)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        super().__init__(max_retries=0, pool_connections=1, pool_maxsize=2)

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
