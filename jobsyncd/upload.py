"""The agent's tus 1.0.0 client for resumable audio uploads (contract 6.8).

Owns the upload protocol only: probe the offer, create an upload, resume it chunk by chunk from
the server's offset (HEAD is the truth) with a sha256 Upload-Checksum per chunk, abandon it.
Where the URL and offset are recorded is the caller's business (`offset_callback`). Failures are
the kinds of jobsyncd.remote, plus UploadGone. Spec: tus-resumable-upload-protocol `protocol.md`
1.0.0, cited per section below.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn, TypeVar
from urllib.parse import SplitResult, urljoin, urlsplit

import requests  # costs ~80 ms of start-up: only the commands that upload import us

from .api import AuthRefused, BackOff, Offline, Permanent, TLSFailure, Transient
from .remote import Remote, _server_message, parse_retry_after

TUS_VERSION = "1.0.0"
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
MAX_ANSWER_BYTES = 64 << 10  # tus answers carry headers, and at most a short JSON error
_BLOCK = 1 << 20  # file reads for hashing: memory stays at a few blocks
# A send block must go out within the socket timeout (Python's sendall is bounded as a
# whole): 64 KiB in 10 s needs ~52 kbit/s, slow field links included.
_SEND_BLOCK = 64 << 10

__all__ = [
    "AuthRefused",
    "BackOff",
    "Offline",
    "Permanent",
    "TLSFailure",
    "Transient",
    "UploadGone",
    "UploadOutcome",
    "Uploader",
]


class UploadGone(Transient):
    """The server no longer has this upload (404/410: expired, terminated, another server's
    URL, or one for a file of another size): start a new one. A Transient, so that a caller
    that does not sort it out still counts an error and retries, never fails the job."""


@dataclass(frozen=True)
class UploadOutcome:
    """Where an upload stands after `resume`: complete, or stopped between chunks."""

    url: str
    offset: int
    length: int
    sha256: str | None  # of the whole local file, when complete; compare with the job's audio

    @property
    def complete(self) -> bool:
        return self.offset == self.length


class _ChunkBody:
    """One chunk of the file as a request body: read block by block while it is sent, counted
    for the progress callback; a Content-Length from __len__. Its hashes were taken before it
    went out (_DigestAhead): sending does nothing else."""

    def __init__(self, f: BinaryIO, start: int, size: int, sent: Callable[[int], None]) -> None:
        self._f = f
        self._left = size
        self._size = size
        self.fed = 0
        self._sent = sent
        f.seek(start)

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        # Larger blocks than urllib3's 16 KiB: fewer Python round trips per chunk.
        want = min(max(size, _SEND_BLOCK), self._left)
        if want <= 0:
            return b""
        data = self._f.read(want)
        if not data:
            raise OSError("the audio file became shorter during the upload")
        self._left -= len(data)
        self.fed += len(data)
        self._sent(len(data))
        return data


_F = TypeVar("_F", bound=Callable[..., Any])


def _redacted(method: _F) -> _F:
    @functools.wraps(method)
    def wrapper(self: Uploader, *args: Any, **kwargs: Any) -> Any:
        with self._redacting():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Uploader:
    """The resumable uploads of one server, `<api_base>/uploads`, sent through its Remote: the
    same session (token, TLS, proxies), timeouts, whole-answer limit, watchdog accounting and
    token redaction as every other request of the agent."""

    def __init__(
        self,
        remote: Remote,
        chunk_bytes: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be at least 1")
        self.remote = remote
        self.uploads_url = remote.api_base + "/uploads"
        self.chunk_bytes = chunk_bytes
        self.progress = progress
        self.checksum_algorithm = "sha256"
        self.max_size: int | None = None

    # -- transport ----------------------------------------------------------------------------

    def _path(self, url: str) -> str:
        """The URL as a path under the API base; UploadGone when it is elsewhere: the session
        sends the token with every request, never to another host than ours."""
        base, target = urlsplit(self.remote.api_base), urlsplit(url)
        if _origin(target) != _origin(base) or not target.path.startswith(base.path + "/"):
            raise UploadGone(f"the upload URL is not on this server ({_origin(target)})")
        return target.path[len(base.path) :]

    def _request(
        self, method: str, url: str, headers: Mapping[str, str], data: Any = None
    ) -> tuple[requests.Response, bytes]:
        # Remote._send maps transport failures to Offline/TLSFailure/Transient and bounds the
        # answer; the statuses are sorted here, tus has its own (409, 410, 423, 460).
        return self.remote._send(
            method, self._path(url), headers=dict(headers), data=data, max_bytes=MAX_ANSWER_BYTES
        )

    def _redacting(self) -> contextlib.AbstractContextManager[None]:
        # The token is replaced by *** in every error text leaving these methods (contract 3),
        # by the Remote's own redaction where it has one.
        redacting = getattr(self.remote, "_redacting", None)
        return redacting() if redacting is not None else contextlib.nullcontext()

    def _fail(self, response: requests.Response, body: bytes, method: str, gone: bool) -> NoReturn:
        """Raise the kind for a status that is not the success expected."""
        status = response.status_code
        what = f"{method} upload: "
        if status < 300:
            raise Transient(f"{what}unexpected answer {status}")
        if status in (401, 403):
            raise AuthRefused(status)
        if status in (429, 503):
            raise BackOff(status, parse_retry_after(response.headers.get("Retry-After")))
        if gone and status in (404, 410):
            # tus 1.0.0, Expiration: 404/410 for a removed upload; the client starts anew.
            raise UploadGone(f"{what}the server no longer has this upload ({status})")
        if status >= 500 or status == 423:  # 423: a stale request of ours still holds it
            raise Transient(f"{what}server answered {status}{_server_message(body)}")
        if 300 <= status < 400:
            raise Transient(f"{what}the server redirects (status {status}); not followed")
        if status == 413:
            raise Permanent(f"{what}the audio is larger than the server accepts (413)")
        if status in (404, 405):
            # The creation URL is gone: the server stopped offering uploads since the probe.
            raise Transient(f"{what}the server does not offer resumable uploads ({status})")
        raise Permanent(f"{what}refused by the server ({status}){_server_message(body)}")

    # -- the protocol -------------------------------------------------------------------------

    @_redacted
    def probe(self) -> bool:
        """Does the server offer tus 1.0.0 with creation and a checksum we can use? (tus 1.0.0,
        Core > OPTIONS; no Tus-Resumable in the request). 404/405: not offered; so is 501, a
        server that does not know the method at all (RFC 9110 15.6.2): not a failure that
        passes, so it must not error the job at every pass."""
        response, body = self._request("OPTIONS", self.uploads_url, {})
        if response.status_code in (404, 405, 501):
            return False
        if response.status_code not in (200, 204):
            if response.status_code in (401, 403, 429, 503) or response.status_code >= 500:
                self._fail(response, body, "OPTIONS", gone=False)
            return False
        versions = _header_list(response, "Tus-Version")
        extensions = _header_list(response, "Tus-Extension")
        algorithms = _header_list(response, "Tus-Checksum-Algorithm")
        if TUS_VERSION not in versions or "creation" not in extensions:
            return False
        if "checksum" not in extensions or not {"sha256", "sha1"} & set(algorithms):
            return False  # each chunk must carry a checksum the server verifies (6.8)
        self.checksum_algorithm = "sha256" if "sha256" in algorithms else "sha1"
        max_size = response.headers.get("Tus-Max-Size", "").strip()
        self.max_size = int(max_size) if max_size.isdigit() else None
        return True

    @_redacted
    def start(self, path: str, filename: str) -> str:
        """Create an upload for the file (tus 1.0.0, Creation > POST); returns its absolute
        URL (a relative Location is resolved against the creation URL)."""
        size = _size_of(path)
        if self.max_size is not None and size > self.max_size:
            raise Permanent(f"the audio ({size} bytes) is larger than the server accepts")
        encoded = base64.b64encode(filename.encode("utf-8")).decode("ascii")
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Upload-Length": str(size),
            "Upload-Metadata": f"filename {encoded}",
        }
        response, body = self._request("POST", self.uploads_url, headers)
        if response.status_code != 201:
            self._fail(response, body, "POST", gone=False)
        location = response.headers.get("Location", "").strip()
        if not location:
            raise Transient("POST upload: the server answered without a Location")
        url = urljoin(self.uploads_url + "/", location)
        try:
            self._path(url)
        except UploadGone:
            raise Transient("POST upload: the server gave an upload URL outside its API") from None
        return url

    @_redacted
    def offset(self, url: str, size: int) -> int:
        """The server's offset for the upload (tus 1.0.0, Core > HEAD): the only truth about
        which bytes it has. UploadGone when it is gone or belongs to a file of another size."""
        response, body = self._request("HEAD", url, {"Tus-Resumable": TUS_VERSION})
        if response.status_code not in (200, 204):
            self._fail(response, body, "HEAD", gone=True)
        offset = _int_header(response, "Upload-Offset")
        length = _int_header(response, "Upload-Length")
        if offset is None:
            raise Transient("HEAD upload: the answer has no Upload-Offset")
        if (length is not None and length != size) or offset > size:
            raise UploadGone("the upload on the server is for a file of another size")
        return offset

    @_redacted
    def resume(
        self,
        url: str,
        path: str,
        offset_callback: Callable[[str, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        new: bool = False,
    ) -> UploadOutcome:
        """Send what the server lacks, in chunks of `chunk_bytes`, each PATCH with an
        Upload-Checksum. `offset_callback(url, offset)` runs after each chunk the server
        confirmed; `should_stop()` is asked before each chunk, and a True returns the outcome
        so far. A 409 re-reads the offset once; a 460 sends the chunk once more. `new`: the
        upload was just created by `start` (offset 0, nobody else knows its URL): no HEAD."""
        size = _size_of(path)
        offset = 0 if new else self.offset(url, size)
        with contextlib.ExitStack() as files:
            try:
                f = files.enter_context(open(path, "rb"))
                ahead = files.enter_context(
                    contextlib.closing(_DigestAhead(path, self.checksum_algorithm))
                )
            except OSError as exc:
                raise Permanent(f"cannot read the audio file {path}: {exc.strerror}") from None
            whole = _hash_prefix(f, offset)
            self._report(offset, size)
            conflicts = mismatches = 0
            while offset < size:
                if should_stop is not None and should_stop():
                    return UploadOutcome(url, offset, size, None)
                n = min(self.chunk_bytes, size - offset)
                digest, whole_after = ahead.take(offset, n, whole)
                if offset + n < size:  # hashed while this chunk travels and is stored
                    ahead.start(offset + n, min(self.chunk_bytes, size - offset - n), whole_after)
                body = _ChunkBody(f, offset, n, self._sending(offset, size))
                status, new_offset = self._patch(url, offset, body, digest)
                if status == 409:
                    conflicts += 1
                    if conflicts > 1:
                        raise Transient("PATCH upload: the offset conflicted twice (409)")
                    offset = self.offset(url, size)
                    whole = _hash_prefix(f, offset)
                    continue
                if status == 460:
                    mismatches += 1
                    if mismatches > 1:
                        raise Transient("PATCH upload: checksum mismatch twice (460)")
                    self._report(offset, size)
                    continue
                conflicts = mismatches = 0
                if new_offset == offset + n and body.fed == n:
                    whole = whole_after
                else:
                    whole = _hash_prefix(f, new_offset)  # the server kept another amount
                offset = new_offset
                self._report(offset, size)
                if offset_callback is not None:
                    offset_callback(url, offset)
            return UploadOutcome(url, offset, size, whole.hexdigest())

    def _sending(self, offset: int, size: int) -> Callable[[int], None]:
        sent = [offset]

        def on_sent(count: int) -> None:
            sent[0] += count
            self._report(sent[0], size)

        return on_sent

    def _patch(self, url: str, offset: int, body: _ChunkBody, digest: bytes) -> tuple[int, int]:
        """One chunk (tus 1.0.0, Core > PATCH; Checksum > Upload-Checksum). Returns (status,
        the new offset); 409 and 460 are for `resume` to act on."""
        n = len(body)
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Content-Type": OFFSET_CONTENT_TYPE,
            "Upload-Offset": str(offset),
            "Upload-Checksum": f"{self.checksum_algorithm} {base64.b64encode(digest).decode()}",
        }
        response, answer = self._request("PATCH", url, headers, data=body)
        status = response.status_code
        if status in (409, 460):
            return status, offset
        if status not in (200, 204):
            self._fail(response, answer, "PATCH", gone=True)
        new_offset = _int_header(response, "Upload-Offset")
        if new_offset is None or not offset <= new_offset <= offset + n:
            raise Transient("PATCH upload: the answer has no usable Upload-Offset")
        return status, new_offset

    @_redacted
    def abandon(self, url: str) -> None:
        """Terminate the upload (tus 1.0.0, Termination > DELETE); one already gone is fine,
        and a URL on another host is left alone (our token never goes there)."""
        try:
            self._path(url)
        except UploadGone:
            return
        response, body = self._request("DELETE", url, {"Tus-Resumable": TUS_VERSION})
        if response.status_code in (200, 204, 404, 410):
            return
        self._fail(response, body, "DELETE", gone=True)

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


def _origin(parts: SplitResult) -> str:
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


def _header_list(response: requests.Response, name: str) -> list[str]:
    return [item.strip() for item in response.headers.get(name, "").split(",") if item.strip()]


def _int_header(response: requests.Response, name: str) -> int | None:
    text = response.headers.get(name, "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _size_of(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise Permanent(f"cannot read the audio file {path}: {exc.strerror}") from None


def _hash_prefix(f: BinaryIO, upto: int) -> Any:
    """sha256 of the file's first `upto` bytes: what the server already has."""
    whole = hashlib.sha256()
    f.seek(0)
    left = upto
    while left > 0:
        data = f.read(min(_BLOCK, left))
        if not data:
            raise Transient("the audio file became shorter during the upload")
        whole.update(data)
        left -= len(data)
    return whole


class _DigestAhead:
    """The next chunk's checksum and the whole-file sha256 through it, both fed from one read
    of the chunk, in a thread of its own while the current chunk is sent and stored (hashlib
    lets go of the GIL for large blocks), from a file handle of its own. One thread for the
    whole upload: starting one per chunk cost a scheduler round trip each on a busy machine."""

    def __init__(self, path: str, algorithm: str) -> None:
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        self._algorithm = algorithm
        self._buffer = bytearray(_BLOCK)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._job: tuple[int, int, Any] | None = None
        self._busy = False
        self._closed = False
        self._key: tuple[int, int] | None = None
        self._result: tuple[bytes, Any] | BaseException | None = None

    def start(self, offset: int, n: int, whole: Any) -> None:
        """Begin on the chunk at `offset`; `whole` is the file's sha256 up to `offset` (not
        changed: a copy is fed)."""
        with self._cond:
            self._wait_idle()
            self._key, self._result = (offset, n), None
            self._job, self._busy = (offset, n, whole.copy()), True
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._job is None:
                    return
                offset, n, whole = self._job
                self._job = None
            result: tuple[bytes, Any] | BaseException
            try:
                result = self._digest(offset, n, whole)
            except BaseException as exc:  # handed to take()
                result = exc
            with self._cond:
                self._result, self._busy = result, False
                self._cond.notify_all()

    def take(self, offset: int, n: int, whole: Any) -> tuple[bytes, Any]:
        """(the chunk's digest, the file's sha256 through the chunk); `whole` is the sha256 up
        to `offset`, used when the chunk was not started ahead."""
        with self._cond:
            self._wait_idle()
            result, key = self._result, self._key
            self._key = self._result = None
        if key == (offset, n) and isinstance(result, tuple):
            return result
        if key == (offset, n) and isinstance(result, BaseException):
            raise result
        return self._digest(offset, n, whole.copy())  # the thread is idle: its buffer is free

    def _digest(self, start: int, n: int, whole: Any) -> tuple[bytes, Any]:
        # The chunk's checksum goes in the header, before the body: the chunk is read here and
        # again as it is sent (from the page cache), never held whole in memory.
        # From offset 0 a sha256 checksum is the whole-file hash so far: one pass feeds both.
        chunk = None if start == 0 and self._algorithm == "sha256" else hashlib.new(self._algorithm)
        view = memoryview(self._buffer)
        self._f.seek(start)
        left = n
        while left > 0:
            got = self._f.readinto(view[: min(_BLOCK, left)])
            if not got:
                raise Transient("the audio file became shorter during the upload")
            if chunk is not None:
                chunk.update(view[:got])
            whole.update(view[:got])
            left -= got
        return (whole if chunk is None else chunk).digest(), whole

    def _wait_idle(self) -> None:
        while self._busy:  # the lock is held
            self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._wait_idle()
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._f.close()
