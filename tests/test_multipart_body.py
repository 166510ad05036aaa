"""`remote.MultipartBody`: the multipart/form-data body the agent streams from an audio file
(pure logic: the body's bytes, no server). The system tests in test_resumable_uploads.py send
it to real servers."""

from __future__ import annotations

import os
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import pytest

from jobsyncd.remote import MultipartBody


def body_of(tmp_path: Path, data: bytes, fields: dict[str, str], filename: str = "a.wav"):
    path = tmp_path / "audio.bin"
    path.write_bytes(data)
    fh = open(path, "rb")  # noqa: SIM115 - closed by the caller
    return MultipartBody(fields, "audio", filename, fh), fh, path


def read_all(body: MultipartBody, block: int) -> bytes:
    out = []
    for _ in range(1 << 20):  # bounded: a body never needs more reads than this
        chunk = body.read(block)
        if not chunk:
            return b"".join(out)
        out.append(chunk)
    raise AssertionError("the body never ended")


def parts(raw: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    return {
        part.get_param("name", header="content-disposition"): (
            part.get_filename(),
            part.get_payload(decode=True),
        )
        for part in message.iter_parts()
    }


@pytest.mark.parametrize("block", [1, 7, 8192, 1 << 20])
def test_the_body_holds_each_field_and_the_files_bytes_and_is_as_long_as_it_says(tmp_path, block):
    data = os.urandom(100_003)
    fields = {"local_id": "0193a0a0-0000-7000-8000-000000000001", "text": 'zürich "✓"\r\nline'}
    body, fh, _ = body_of(tmp_path, data, fields)
    with fh:
        raw = read_all(body, block)
    assert len(raw) == body.len
    got = parts(raw, body.content_type)
    assert got["audio"] == ("a.wav", data)
    assert got["text"][1].decode() == fields["text"]
    assert got["local_id"][1].decode() == fields["local_id"]


def test_a_quote_or_line_break_in_a_file_name_cannot_break_out_of_its_header(tmp_path):
    body, fh, _ = body_of(tmp_path, b"x", {}, filename='a"\r\nX-Evil: 1.wav')
    with fh:
        raw = read_all(body, 8192)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"X-Evil" not in head.split(b"\r\n")[0] and b"\r\nX-Evil" not in head


def test_a_file_that_shrinks_while_it_is_sent_fails_the_body_not_its_length(tmp_path):
    body, fh, path = body_of(tmp_path, os.urandom(50_000), {"text": "t"})
    with fh:
        os.truncate(path, 1_000)
        with pytest.raises(OSError, match="shrank"):
            read_all(body, 8192)


def test_a_file_that_grows_while_it_is_sent_is_sent_as_long_as_it_was(tmp_path):
    data = os.urandom(50_000)
    body, fh, path = body_of(tmp_path, data, {})
    with fh:
        with open(path, "ab") as grow:
            grow.write(b"more" * 1000)
        raw = read_all(body, 8192)
    assert len(raw) == body.len
    assert parts(raw, body.content_type)["audio"][1] == data
