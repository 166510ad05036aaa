"""Reading request bodies: never past Content-Length, JSON up to its limit, and a streaming
multipart/form-data reader whose `audio` part goes straight into an AudioUpload.
"""

from __future__ import annotations

import email.message
import email.utils
from collections.abc import Callable
from typing import Any, Protocol

from jobsyncd.server import validation
from jobsyncd.server.errors import HTTPError
from jobsyncd.server.storage.audio import AudioDir, AudioUpload

MAX_JSON_BYTES = 1 << 20  # JSON bodies, and the non-file fields of a multipart body together
_CHUNK = 1 << 16


class _Input(Protocol):
    """`wsgi.input` (PEP 3333): whatever the WSGI server hands over; only read() is used."""

    def read(self, size: int, /) -> bytes: ...


class Body:
    """The request body, never read past its Content-Length; knows whether it was read whole."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self._input: _Input = environ["wsgi.input"]
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
        self.size_read = 0  # bytes of JSON read by read_json_body

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


def read_json_body(
    body: Body, limit: int = MAX_JSON_BYTES, strict_numbers: bool = True
) -> dict[str, Any]:
    """The body as a JSON object. With strict_numbers False, 1e999 reads as infinity, for the
    caller to refuse where it belongs (one operation of a batch, not the whole batch)."""
    if body.remaining is not None and body.remaining > limit:
        raise HTTPError(413, f"JSON body larger than {limit} bytes")
    chunks = []
    size = 0
    while True:
        data = body.read(_CHUNK)
        if not data:
            break
        size += len(data)
        if size > limit:
            raise HTTPError(413, f"JSON body larger than {limit} bytes")
        chunks.append(data)
    body.size_read = size
    try:
        document = validation.loads(b"".join(chunks).decode("utf-8"), strict_numbers)
    except validation.Invalid as e:
        raise HTTPError(422, str(e)) from None
    except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None
    if not isinstance(document, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return document


class Multipart:
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
            while self.buf.startswith((b" ", b"\t")):
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
            upload.filename = sanitise_filename(headers.get_filename())

            def write(data: bytes) -> None:
                if upload.size + len(data) > self.max_audio:
                    raise HTTPError(413, f"audio larger than {self.max_audio} bytes")
                upload.write(data)

            self._until(self.sep, write)
            return
        chunks: list[bytes] = []
        # The metadata field has its own limit, and going over it is an invalid value (422,
        # contract section 7); the other fields together are a body too large (413).
        is_metadata = name == "metadata"
        size = [0]

        def keep(data: bytes) -> None:
            if is_metadata:
                size[0] += len(data)
                if size[0] > validation.MAX_METADATA_BYTES:
                    raise HTTPError(
                        422, f"metadata larger than {validation.MAX_METADATA_BYTES} bytes as JSON"
                    )
            else:
                self.field_bytes += len(data)
                if self.field_bytes > MAX_JSON_BYTES:
                    raise HTTPError(413, f"multipart fields larger than {MAX_JSON_BYTES} bytes")
            chunks.append(data)

        self._until(self.sep, keep)
        try:
            self.fields[name] = b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, f"multipart field {name!r} is not UTF-8") from None


def sanitise_filename(name: str | None) -> str:
    """The client's file name as metadata: last path component, no control characters."""
    if not name:
        return "audio"
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF)
    name = name.strip().lstrip(".")[:255]
    return name or "audio"
