"""Resumable audio uploads for the reference server: tus 1.0.0 (core, creation, checksum,
termination, expiration) at /api/v1/uploads, framework-independent (contract 6.8 and 7).

`UploadStore` owns the partial files: one data file and one JSON sidecar per upload under
`<audio dir>/.uploads/`, locked with flock so that threads and worker processes (gunicorn) share
it, whatever engine stores the jobs. `handle` is the WSGI handler. Spec: tus-resumable-upload-
protocol `protocol.md` 1.0.0; the sections are cited where the code follows them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import email.utils
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,checksum,termination,expiration"
CHECKSUM_ALGORITHMS = ("sha1", "sha256")
DEFAULT_EXPIRY_SECONDS = 24 * 3600
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
SUBDIR = ".uploads"
MAX_METADATA_CHARS = 4096
ORPHAN_GRACE_SECONDS = 3600  # a data file without a sidecar this old was left by a crash
SWEEP_INTERVAL_SECONDS = 600  # expire_due() runs expire() at most this often per process
WRITER_WAIT_SECONDS = 1.0  # a PATCH waits this long for one still being written, then 423
DRAIN_FACTOR = 4  # after an early error, read and drop up to this many times the size limit
_BLOCK = 1 << 20
_FADVISE = getattr(os, "posix_fadvise", None)
# A sidecar holds two slots of this size; a record is at most ~25 KiB (4,096 characters of
# metadata, each escaped to at most 6 in JSON).
_SLOT = 32 << 10
_HASH_CACHE_SIZE = 256
_ID_RE = re.compile(r"[0-9a-f]{32}")
_KEY_RE = re.compile(r"[!-+\--~]+")  # printable ASCII without space and comma
_DIGEST_SIZES = {"sha1": 20, "sha256": 32}


class UploadError(Exception):
    """A request the store refuses: an HTTP status, a message for `{"error": ...}`, headers."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


@dataclasses.dataclass(frozen=True)
class UploadInfo:
    """What the sidecar says about one upload."""

    id: str
    user: str
    length: int
    offset: int
    metadata: str  # the Upload-Metadata header as the client sent it ("" for none)
    created_at: float
    expires_at: float
    received: int  # body bytes read for this upload, stored or not (a cut chunk, a 460 chunk)
    stored: int  # body bytes kept: equal to `offset` unless a byte was ever stored twice

    @property
    def complete(self) -> bool:
        return self.offset == self.length

    @property
    def filename(self) -> str | None:
        value = parse_metadata(self.metadata).get("filename")
        return value.decode("utf-8", "replace") if value is not None else None


@dataclasses.dataclass(frozen=True)
class ConsumedUpload:
    """A finished upload taken out of the store: its file now lives at `path`, the caller's."""

    path: Path
    size: int
    sha256: str
    filename: str | None


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _disk_full(e: OSError) -> UploadError:
    return UploadError(507, f"the server cannot store the upload: {e.strerror}")


def _slot(record: dict[str, Any]) -> bytes:
    """One slot of a sidecar: `<crc32 of the JSON, 8 hex digits> <JSON>\\n`."""
    text = json.dumps(record, separators=(",", ":")).encode()
    if len(text) + 10 > _SLOT:
        raise UploadError(400, "Upload-Metadata is too long")
    return b"%08x %s\n" % (zlib.crc32(text), text)


def _newest_slot(raw: bytes) -> dict[str, Any] | None:
    """The record of the sidecar's slot with the highest `seq` among those whose checksum
    holds; a sidecar in the format before slots is one JSON record."""
    if raw[:1] == b"{":
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None
    best: dict[str, Any] | None = None
    for start in (0, _SLOT):
        line, newline, _ = raw[start : start + _SLOT].partition(b"\n")
        if not newline or line[8:9] != b" ":
            continue
        try:
            if int(line[:8], 16) != zlib.crc32(line[9:]):
                continue
            record = json.loads(line[9:])
        except ValueError:
            continue
        newer = isinstance(record, dict) and isinstance(record.get("seq"), int)
        if newer and (best is None or record["seq"] > best["seq"]):
            best = record
    return best


def _write_behind(f: BinaryIO, start: int, size: int) -> None:
    """Start writing the block just written to disk now, without waiting: the fsync before a
    chunk is confirmed then waits for the last block only, not for the whole chunk (measured on
    64 MiB in 4 MiB chunks: 50-120 ms of fsync down to 5-8 ms). POSIX_FADV_DONTNEED starts the
    writeback of dirty pages (Linux); pages already clean may leave the page cache, which the
    running sha256 never reads back."""
    if _FADVISE is None or size < _BLOCK // 4:
        return
    try:
        f.flush()
        _FADVISE(f.fileno(), start, size, os.POSIX_FADV_DONTNEED)
    except (OSError, ValueError):
        pass  # a hint only: the fsync that follows is what makes the data durable


def parse_metadata(header: str) -> dict[str, bytes]:
    """Upload-Metadata (tus 1.0.0, Creation > Headers > Upload-Metadata): comma-separated
    `key base64value` pairs, keys unique and without spaces or commas, a value may be absent."""
    result: dict[str, bytes] = {}
    if not header.strip():
        return result
    for pair in header.split(","):
        key, _, value = pair.strip().partition(" ")
        if not _KEY_RE.fullmatch(key) or key in result or " " in value.strip():
            raise UploadError(400, "Upload-Metadata is malformed")
        try:
            result[key] = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise UploadError(400, f"Upload-Metadata value of {key!r} is not base64") from None
    return result


def http_date(moment: float) -> str:
    """RFC 9110 5.6.7 IMF-fixdate, the format Upload-Expires takes (tus 1.0.0, Expiration)."""
    return email.utils.formatdate(moment, usegmt=True)


class UploadStore:
    """Uploads as files in `directory/.uploads/`: `<id>` (the bytes) and `<id>.json` (the
    sidecar: owner, length, confirmed offset, metadata, expiry). Safe across threads and
    processes: a short exclusive flock on `.uploads/.lock` around every sidecar change, and a
    non-blocking flock on the data file for the one request writing it."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        expiry_seconds: float = DEFAULT_EXPIRY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.root = self.directory / SUBDIR
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.expiry_seconds = expiry_seconds
        self.clock = clock
        self._lock_path = self.root / ".lock"
        # hashlib cannot save a hash's state, so the running sha256 of each upload lives in the
        # process that received its bytes; consume() hashes from disk only what it lacks.
        self._hashes: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._hashes_lock = threading.Lock()
        self._last_sweep = float("-inf")

    # -- files and locks ----------------------------------------------------------------------

    def _data(self, upload_id: str) -> Path:
        return self.root / upload_id

    def _sidecar(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}.json"

    @contextlib.contextmanager
    def _meta_lock(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def _writer(self, upload_id: str, wait: float = 0.0) -> Iterator[BinaryIO]:
        """The data file, opened for writing and held by this request alone (else 423)."""
        try:
            f = open(self._data(upload_id), "r+b")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise UploadError(404, "no such upload") from None
        try:
            deadline = time.monotonic() + wait
            while not _try_flock(f.fileno()):
                if time.monotonic() >= deadline:
                    # Another request is still writing: a client whose connection broke came
                    # back before the server noticed. That request ends at its socket timeout.
                    raise UploadError(423, "the upload is being written by another request")
                time.sleep(0.02)
            yield f
        finally:
            f.close()

    def _read_sidecar(self, upload_id: str) -> dict[str, Any] | None:
        try:
            with open(self._sidecar(upload_id), "rb") as f:
                raw = f.read(2 * _SLOT)
        except FileNotFoundError:
            return None
        except OSError:
            return None  # damaged: treated as gone; expire() removes it
        return _newest_slot(raw)

    def _write_sidecar(self, record: dict[str, Any]) -> None:
        """A new sidecar (or one in the format before slots): a temp file holding slot 0,
        renamed into place."""
        record["seq"] = 0
        path = self._sidecar(record["id"])
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _slot(record))
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _update_sidecar(self, record: dict[str, Any]) -> None:
        """Write the record over the older of the sidecar's two slots, in place: no temp file
        and no rename per chunk (on ext4 a rename over a file flushes the new one, 1-3 ms). A
        write cut by a crash, or read half-done by another process, fails its checksum, and
        the other slot, one state older, counts. Not fsynced: the data it confirms already
        is, so a power loss can only take it back to an older offset (the client then sends
        those bytes again), never make it claim bytes not on disk."""
        seq = record.get("seq")
        if not isinstance(seq, int):
            self._write_sidecar(record)
            return
        record["seq"] = seq + 1
        fd = os.open(self._sidecar(record["id"]), os.O_WRONLY)
        try:
            data = _slot(record)
            if os.pwrite(fd, data, (seq + 1) % 2 * _SLOT) != len(data):
                raise OSError(errno.ENOSPC, "short write")
        finally:
            os.close(fd)

    def _info(self, record: dict[str, Any]) -> UploadInfo:
        return UploadInfo(
            id=record["id"],
            user=record["user"],
            length=record["length"],
            offset=record["offset"],
            metadata=record.get("metadata", ""),
            created_at=record["created_at"],
            expires_at=record["expires_at"],
            received=record.get("received", 0),
            stored=record.get("stored", 0),
        )

    def _load(self, user: str, upload_id: str) -> dict[str, Any]:
        """The sidecar of the user's live upload; 404 for an unknown or another user's id,
        410 for an expired one (tus 1.0.0, Expiration: 410 when the server keeps track)."""
        if not _ID_RE.fullmatch(upload_id):
            raise UploadError(404, "no such upload")
        record = self._read_sidecar(upload_id)
        if record is None or record.get("user") != user:
            raise UploadError(404, "no such upload")
        if self.clock() >= record["expires_at"]:
            self._purge_if_idle(upload_id)
            raise UploadError(410, "the upload has expired")
        return record

    def _remove_files(self, upload_id: str) -> None:
        # Sidecar first: without it the upload is gone for every request at once.
        for path in (self._sidecar(upload_id), self._data(upload_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._forget_hash(upload_id)

    def _purge_if_idle(self, upload_id: str) -> bool:
        try:
            with self._writer(upload_id), self._meta_lock():
                record = self._read_sidecar(upload_id)
                if record is None or self.clock() >= record["expires_at"]:
                    self._remove_files(upload_id)
                    return True
        except UploadError as e:
            if e.status == 404:  # no data file: only a sidecar may be left
                with self._meta_lock(), contextlib.suppress(FileNotFoundError):
                    self._sidecar(upload_id).unlink()
                return True
            return False  # being written right now: the next sweep takes it
        return False

    # -- running sha256 -----------------------------------------------------------------------

    def _hash_at(self, upload_id: str, offset: int) -> Any | None:
        with self._hashes_lock:
            cached = self._hashes.get(upload_id)
        if offset == 0:
            return hashlib.sha256()
        if cached is not None and cached[0] == offset:
            return cached[1].copy()
        return None

    def _remember_hash(self, upload_id: str, offset: int, running: Any) -> None:
        with self._hashes_lock:
            self._hashes[upload_id] = (offset, running)
            self._hashes.move_to_end(upload_id)
            while len(self._hashes) > _HASH_CACHE_SIZE:
                self._hashes.popitem(last=False)

    def _forget_hash(self, upload_id: str) -> None:
        with self._hashes_lock:
            self._hashes.pop(upload_id, None)

    def _final_sha256(self, upload_id: str, f: BinaryIO, length: int) -> str:
        with self._hashes_lock:
            cached = self._hashes.get(upload_id)
        if cached is not None and cached[0] <= length:
            start, running = cached[0], cached[1].copy()
        else:
            start, running = 0, hashlib.sha256()
        f.seek(start)
        left = length - start
        while left > 0:  # only what another worker process received is read back
            data = f.read(min(_BLOCK, left))
            if not data:
                raise UploadError(500, "the upload's file is shorter than its offset")
            running.update(data)
            left -= len(data)
        digest: str = running.hexdigest()
        return digest

    # -- the operations -----------------------------------------------------------------------

    def create(self, user: str, length: int, metadata: str = "") -> UploadInfo:
        """A new empty upload of `length` bytes (tus 1.0.0, Creation > POST); 413 over the
        server's limit. An upload of length 0 is complete at once."""
        if length < 0:
            raise UploadError(400, "Upload-Length must be a non-negative integer")
        if length > self.max_bytes:
            raise UploadError(413, f"upload larger than the limit ({self.max_bytes} bytes)")
        if len(metadata) > MAX_METADATA_CHARS:
            raise UploadError(400, f"Upload-Metadata longer than {MAX_METADATA_CHARS} characters")
        parse_metadata(metadata)
        upload_id = secrets.token_hex(16)
        now = self.clock()
        record = {
            "id": upload_id,
            "user": user,
            "length": length,
            "offset": 0,
            "metadata": metadata.strip(),
            "created_at": now,
            "expires_at": now + self.expiry_seconds,
            "received": 0,
            "stored": 0,
        }
        # Data file before sidecar: a crash between them leaves an orphan expire() removes.
        os.close(os.open(self._data(upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with self._meta_lock():
            self._write_sidecar(record)
        return self._info(record)

    def head(self, user: str, upload_id: str) -> UploadInfo:
        """Where the upload stands (tus 1.0.0, Core > HEAD); 404/410 when it does not exist."""
        record = self._load(user, upload_id)
        if not self._data(upload_id).exists():
            raise UploadError(404, "no such upload")
        return self._info(record)

    def append(
        self,
        user: str,
        upload_id: str,
        offset: int,
        body: BinaryIO,
        content_length: int | None,
        checksum: tuple[str, bytes] | None = None,
    ) -> UploadInfo:
        """Write `body` at `offset` as it arrives (tus 1.0.0, Core > PATCH).

        409 when `offset` is not the upload's (nothing read); 413 past Upload-Length. With a
        `checksum` (algorithm, digest) the chunk counts only when it arrived whole and matches
        (Checksum extension): else the file is cut back to `offset` and 460 (or 400 when the
        body broke off). Without one, what arrived is kept ("store as much as possible").
        """
        if checksum is not None and checksum[0] not in CHECKSUM_ALGORITHMS:
            raise UploadError(400, f"checksum algorithm not supported: {checksum[0]}")
        self._load(user, upload_id)
        # A request cut a moment ago may still be finishing on the server: wait for it briefly.
        with self._writer(upload_id, wait=WRITER_WAIT_SECONDS) as f:
            record = self._load(user, upload_id)  # again: it may have changed while we waited
            if offset != record["offset"]:
                raise UploadError(
                    409, f"Upload-Offset {offset} is not the upload's offset {record['offset']}"
                )
            if content_length is not None and offset + content_length > record["length"]:
                raise UploadError(413, "the chunk goes past the upload's Upload-Length")
            written, broken, digest, running = self._receive(
                upload_id, f, offset, record["length"], body, content_length, checksum
            )
            mismatch = checksum is not None and not broken and digest != checksum[1]
            keep = 0 if checksum is not None and (broken or mismatch) else written
            if keep != written:
                f.truncate(offset + keep)
            if keep:
                try:
                    f.flush()
                    os.fsync(f.fileno())  # the data is durable before the sidecar confirms it
                except OSError as e:
                    f.truncate(offset)
                    raise _disk_full(e) from None
            with self._meta_lock():
                current = self._read_sidecar(upload_id)
                if current is None:
                    raise UploadError(404, "the upload was terminated")
                record = current
                record["received"] = record.get("received", 0) + written
                if keep:
                    now = self.clock()
                    record["offset"] = offset + keep
                    record["stored"] = record.get("stored", 0) + keep
                    record["expires_at"] = now + self.expiry_seconds
                self._update_sidecar(record)
            if keep == written and running is not None:
                self._remember_hash(upload_id, offset + keep, running)
            elif keep != written:
                self._forget_hash(upload_id)
            if checksum is not None and broken:
                raise UploadError(400, "the chunk arrived incomplete; nothing of it was stored")
            if mismatch:
                raise UploadError(460, "checksum mismatch; nothing of the chunk was stored")
            return self._info(record)

    def _receive(
        self,
        upload_id: str,
        f: BinaryIO,
        offset: int,
        length: int,
        body: BinaryIO,
        content_length: int | None,
        checksum: tuple[str, bytes] | None,
    ) -> tuple[int, bool, bytes | None, Any | None]:
        """Copy the body to the file at `offset` block by block (never whole in memory).
        Returns (bytes written, whether the body broke off, its digest, the running sha256)."""
        if os.fstat(f.fileno()).st_size != offset:
            f.truncate(offset)  # a tail past the confirmed offset (a crash mid-chunk) is not data
        f.seek(offset)
        running = self._hash_at(upload_id, offset)
        # From offset 0 a sha256 chunk checksum is the running sha256 itself: hashed once.
        shared = offset == 0 and checksum is not None and checksum[0] == "sha256"
        chunk_hash = hashlib.new(checksum[0]) if checksum is not None and not shared else None
        hashes = [h for h in (chunk_hash, running) if h is not None]
        written = 0
        broken = False
        room = length - offset
        while True:
            want = _BLOCK if content_length is None else min(_BLOCK, content_length - written)
            if want <= 0:
                break
            try:
                data = body.read(want)
            except (OSError, ValueError, EOFError):
                broken = True  # the connection broke or the framing was bad
                break
            if not data:
                broken = content_length is not None  # shorter than its Content-Length
                break
            if written + len(data) > room:
                f.truncate(offset)
                raise UploadError(413, "the chunk goes past the upload's Upload-Length")
            try:
                f.write(data)
            except OSError as e:  # a full disk: nothing of the chunk is kept
                f.truncate(offset)
                raise _disk_full(e) from None
            _write_behind(f, offset + written, len(data))
            written += len(data)
            # Inline, not in a thread: on two cores the client's hashing takes the other one
            # (measured: a hash thread here gained nothing).
            for h in hashes:
                h.update(data)
        if shared:
            assert running is not None  # offset 0 always has one
            digest: bytes | None = running.digest()
        else:
            digest = chunk_hash.digest() if chunk_hash is not None else None
        return written, broken, digest, running

    def terminate(self, user: str, upload_id: str) -> None:
        """Free the upload (tus 1.0.0, Termination > DELETE); later requests get 404. A request
        still writing it finds its sidecar gone and stores nothing."""
        if not _ID_RE.fullmatch(upload_id):
            raise UploadError(404, "no such upload")
        with self._meta_lock():
            record = self._read_sidecar(upload_id)
            if record is None or record.get("user") != user:
                raise UploadError(404, "no such upload")
            self._remove_files(upload_id)

    def finished(self, user: str, upload_id: str) -> UploadInfo:
        """The user's complete upload, not consumed: 404/410 when unknown, 409 when not all of
        its bytes arrived yet. For checks before a job names it."""
        info = self.head(user, upload_id)
        if not info.complete:
            raise UploadError(
                409, f"upload {upload_id} is not finished ({info.offset} of {info.length} bytes)"
            )
        return info

    def consume(
        self, user: str, upload_id: str, dest: str | os.PathLike[str] | None = None
    ) -> ConsumedUpload:
        """Take a finished upload out of the store: its file is renamed to `dest` (by default a
        new random name in the audio dir, the server's naming) and the upload is gone. The size
        and sha256 are those of the whole file."""
        self._load(user, upload_id)
        with self._writer(upload_id) as f:
            record = self._load(user, upload_id)
            if record["offset"] != record["length"]:
                raise UploadError(
                    409,
                    f"upload {upload_id} is not finished "
                    f"({record['offset']} of {record['length']} bytes)",
                )
            sha256 = self._final_sha256(upload_id, f, record["length"])
            target = Path(dest) if dest is not None else self.directory / uuid.uuid4().hex
            with self._meta_lock():
                if self._read_sidecar(upload_id) is None:
                    raise UploadError(404, "the upload was terminated")
                os.replace(self._data(upload_id), target)
                self._sidecar(upload_id).unlink()
            self._forget_hash(upload_id)
        info = self._info(record)
        return ConsumedUpload(target, info.length, sha256, info.filename)

    def expire(self) -> int:
        """Remove expired uploads, and files a crash left without a sidecar; returns how many
        uploads went. Call at start and periodically (`expire_due` does the second)."""
        now = self.clock()
        self._last_sweep = now
        removed = 0
        names = {p.name for p in self.root.iterdir()}
        for name in sorted(names):
            if name.endswith(".json") and _ID_RE.fullmatch(name[:-5]):
                record = self._read_sidecar(name[:-5])
                if record is None or now >= record.get("expires_at", 0):
                    removed += self._purge_if_idle(name[:-5])
            elif (_ID_RE.fullmatch(name) and f"{name}.json" not in names) or name.endswith(".tmp"):
                # A crash between the data file and its sidecar: old ones only (a create in
                # another process may be between the two right now).
                try:
                    if now - (self.root / name).stat().st_mtime > ORPHAN_GRACE_SECONDS:
                        (self.root / name).unlink()
                except FileNotFoundError:
                    pass
        return removed

    def expire_due(self) -> int:
        """expire() when the last sweep in this process is SWEEP_INTERVAL_SECONDS old."""
        if self.clock() - self._last_sweep < SWEEP_INTERVAL_SECONDS:
            return 0
        return self.expire()


# -- the WSGI handler ---------------------------------------------------------------------------


class _Input:
    """The request body, never read past its Content-Length (a chunked one: until its end)."""

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self._input = environ["wsgi.input"]
        text = environ.get("CONTENT_LENGTH", "") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if text and not chunked:
            if not (text.isascii() and text.isdigit()) or len(text) > 18:
                raise UploadError(400, "Content-Length is not a number")
            self.length: int | None = int(text)
        else:
            self.length = None if chunked else 0
        self.left = self.length
        self.done = self.length == 0

    def read(self, size: int) -> bytes:
        if self.done:
            return b""
        if self.left is not None:
            size = min(size, self.left)
        data: bytes = self._input.read(size)
        if self.left is not None:
            self.left -= len(data)
            self.done = self.left == 0
        if not data:
            self.done = True
        return data

    def drain(self, allowance: int) -> None:
        with contextlib.suppress(OSError, ValueError, EOFError):
            while not self.done and allowance > 0:
                allowance -= len(self.read(min(_BLOCK, allowance))) or allowance


def _common_headers() -> list[tuple[str, str]]:
    return [("Tus-Resumable", TUS_VERSION)]


def _options_headers(store: UploadStore) -> list[tuple[str, str]]:
    # tus 1.0.0, Core > OPTIONS; Checksum > Tus-Checksum-Algorithm; Core > Tus-Max-Size.
    return [
        *_common_headers(),
        ("Tus-Version", TUS_VERSION),
        ("Tus-Extension", TUS_EXTENSIONS),
        ("Tus-Checksum-Algorithm", ",".join(CHECKSUM_ALGORITHMS)),
        ("Tus-Max-Size", str(store.max_bytes)),
    ]


def _status_line(code: int) -> str:
    if code == 460:
        return "460 Checksum Mismatch"  # tus 1.0.0, Checksum: not in the HTTP registry
    return f"{code} {HTTPStatus(code).phrase}"


def _number(environ: Mapping[str, Any], key: str, name: str) -> int | None:
    text = environ.get(key)
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise UploadError(400, f"{name} must be a non-negative integer")
    return int(text)


def _checksum(environ: Mapping[str, Any]) -> tuple[str, bytes] | None:
    """Upload-Checksum: `algorithm base64digest` (tus 1.0.0, Checksum > Upload-Checksum)."""
    text = environ.get("HTTP_UPLOAD_CHECKSUM")
    if text is None:
        return None
    algorithm, _, encoded = text.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise UploadError(400, f"checksum algorithm not supported: {algorithm[:40]!r}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(400, "Upload-Checksum is not base64") from None
    if len(digest) != _DIGEST_SIZES[algorithm]:
        raise UploadError(400, f"Upload-Checksum is not a {algorithm} digest")
    return algorithm, digest


def _expires(info: UploadInfo) -> tuple[str, str]:
    return ("Upload-Expires", http_date(info.expires_at))


def handle(
    environ: dict[str, Any],
    start_response: Callable[..., Any],
    user: str | None,
    store: UploadStore,
    base_path: str = "/api/v1/uploads",
) -> list[bytes]:
    """Answer one request under `base_path` (tus 1.0.0). `user` is the authenticated user, or
    None: then only OPTIONS is answered (it needs no token), anything else is 401. Errors are
    `{"error": ...}` like the rest of the API; HEAD answers carry no body."""
    method = environ.get("REQUEST_METHOD", "GET").upper()
    override = environ.get("HTTP_X_HTTP_METHOD_OVERRIDE")
    if method == "POST" and override:
        # tus 1.0.0, Core > X-HTTP-Method-Override; honoured on POST only, so that the method
        # a caller authenticated is never weaker than the one carried out.
        method = override.strip().upper()
    body: _Input | None = None
    try:
        body = _Input(environ)
        status, headers = _dispatch(environ, method, user, store, base_path, body)
        payload = b""
    except UploadError as e:
        status = e.status
        headers = [*_common_headers(), ("Content-Type", "application/json"), *e.headers]
        payload = json.dumps({"error": e.message}).encode()
        if e.status == 412:
            headers.append(("Tus-Version", TUS_VERSION))  # tus 1.0.0, Core > Tus-Resumable
    if body is not None and not body.done:
        body.drain(DRAIN_FACTOR * store.max_bytes)  # so that the client reads the answer
    if method == "HEAD":
        payload = b""
    if status not in (204, 304):
        headers.append(("Content-Length", str(len(payload))))
    start_response(_status_line(status), headers)
    return [payload] if payload else []


def _dispatch(
    environ: dict[str, Any],
    method: str,
    user: str | None,
    store: UploadStore,
    base_path: str,
    body: _Input,
) -> tuple[int, list[tuple[str, str]]]:
    path = environ.get("PATH_INFO", "")
    base = base_path.rstrip("/")
    if path in (base, base + "/"):
        upload_id = None
        allowed = "OPTIONS, POST"
    elif path.startswith(base + "/") and "/" not in path[len(base) + 1 :]:
        upload_id = path[len(base) + 1 :]
        allowed = "OPTIONS, HEAD, PATCH, DELETE"
    else:
        raise UploadError(404, "not found")
    if method == "OPTIONS":
        return 204, _options_headers(store)  # with or without a token: the offer is public
    if method not in allowed.split(", "):
        raise UploadError(405, f"{method} not allowed here", [("Allow", allowed)])
    if user is None:
        raise UploadError(
            401, "missing or wrong token", [("WWW-Authenticate", 'Bearer realm="jobsyncd"')]
        )
    if environ.get("HTTP_TUS_RESUMABLE", "").strip() != TUS_VERSION:
        # tus 1.0.0, Core > Tus-Resumable: 412 and the request is not processed.
        raise UploadError(412, f"Tus-Resumable must be {TUS_VERSION}")
    store.expire_due()
    if upload_id is None:
        return _create(environ, user, store, body, base)
    if method == "HEAD":
        info = store.head(user, upload_id)
        headers = [
            *_common_headers(),
            ("Upload-Offset", str(info.offset)),
            ("Upload-Length", str(info.length)),
            ("Cache-Control", "no-store"),  # tus 1.0.0, Core > HEAD
            _expires(info),
        ]
        if info.metadata:
            headers.append(("Upload-Metadata", info.metadata))
        return 200, headers
    if method == "PATCH":
        return _patch(environ, user, store, body, upload_id)
    store.terminate(user, upload_id)
    return 204, _common_headers()


def _create(
    environ: dict[str, Any], user: str, store: UploadStore, body: _Input, base: str
) -> tuple[int, list[tuple[str, str]]]:
    """tus 1.0.0, Creation > POST: an empty body, Upload-Length, optional Upload-Metadata."""
    if environ.get("HTTP_UPLOAD_DEFER_LENGTH") is not None:
        raise UploadError(400, "Upload-Defer-Length is not supported; send Upload-Length")
    if body.length != 0:
        raise UploadError(400, "creation-with-upload is not supported: send an empty body")
    length = _number(environ, "HTTP_UPLOAD_LENGTH", "Upload-Length")
    if length is None:
        raise UploadError(400, "Upload-Length is required")
    info = store.create(user, length, environ.get("HTTP_UPLOAD_METADATA", ""))
    # A path-absolute Location: right behind a proxy that rewrites the host (the spec allows
    # a relative URL; clients resolve it against the creation URL).
    location = environ.get("SCRIPT_NAME", "").rstrip("/") + f"{base}/{info.id}"
    return 201, [*_common_headers(), ("Location", location), _expires(info)]


def _patch(
    environ: dict[str, Any], user: str, store: UploadStore, body: _Input, upload_id: str
) -> tuple[int, list[tuple[str, str]]]:
    media = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if media != OFFSET_CONTENT_TYPE:
        raise UploadError(415, f"Content-Type must be {OFFSET_CONTENT_TYPE}")  # Core > PATCH
    offset = _number(environ, "HTTP_UPLOAD_OFFSET", "Upload-Offset")
    if offset is None:
        raise UploadError(400, "Upload-Offset is required")
    checksum = _checksum(environ)
    info = store.append(user, upload_id, offset, body, body.length, checksum)  # type: ignore[arg-type]
    return 204, [*_common_headers(), ("Upload-Offset", str(info.offset)), _expires(info)]
