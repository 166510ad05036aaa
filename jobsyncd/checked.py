"""The store's checked range: which of its first bytes are lines exactly as this version writes
them (storeformat.holdable), and where each of those lines is.

A lazy fold (a sync pass, `Store.fold_lazily`) holds those lines unparsed (jobtable.py) and
parses only the lines after them. Two files say what it may hold:

- CHECKED_NAME, the record: the store's device and inode, the end of the checked bytes and their
  CRC-32, and which bytes of INDEX_NAME describe them (their CRC-32 too);
- INDEX_NAME, the index: each checked line's job id and offset (a tombstone's is -1), and the
  ids whose line names a status that needs a push, in chunks appended as the range grows
  (`encode_chunk`). A fold that reads it neither splits the checked bytes into lines nor
  searches them: it reads them once, for their CRC, and holds them whole.

Compaction writes both anew; a pass moves them on over the lines it checked or wrote. Both are
hints like the due hint (store.HINT_NAME): never fsynced, format free (contract 4), and used only
when every CRC, the device, the inode, CHECK_FORMAT, the version and the byte order match: else
the store is folded the old way (by its lines, or whole) and the index made anew.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NamedTuple

from . import __version__
from .errors import JobsyncdError
from .fsutil import open_nofollow, write_all, write_file_atomically
from .jobtable import Entries

CHECKED_NAME = "jobs.checked.json"
INDEX_NAME = "jobs.checked.idx"
# Bump on a change to what valid_record, Job.from_record, record_json or the index hold.
CHECK_FORMAT = 2
# An index of more chunks than this (many small passes since the last compaction) is written
# anew as one chunk by the next fold: reading a chunk costs a few microseconds, not nothing.
MAX_CHUNKS = 64
# Compaction writes a chunk per this many lines: an index of 100,000 lines is never held as
# Python lists whole (4 MiB of ints) nor encoded in one piece.
CHUNK_LINES = 32768
# A chunk: its lines, the bytes of its ids, of its due ids, of its purged ids (each list of ids
# joined by b"\n"; a little-endian uint32 each), then those three texts and one int64 offset
# per line, native byte order. (struct and array are imported where a chunk is made or read:
# every command that imports the store imports this module.)
_HEADER_FORMAT = "<4I"
_HEADER_SIZE = 16

# What the first `size` bytes of INDEX_NAME hold: `chunks` chunks, with this CRC-32. (The
# functional form: the class form has typing compile each annotation, 2-4 ms of start-up.)
IndexFile = NamedTuple("IndexFile", [("chunks", int), ("size", int), ("crc", int)])  # noqa: UP014
# CHECKED_NAME: the store's bytes [0, end) of (dev, ino) are checked lines, with CRC-32 `crc`.
Record = NamedTuple(  # noqa: UP014 - as IndexFile
    "Record",
    [("dev", int), ("ino", int), ("end", int), ("crc", int), ("index_file", IndexFile | None)],
)


def crc32(data: Any, crc: int = 0) -> int:
    import zlib  # here: the local commands that never keep a checked range never import it

    return zlib.crc32(data, crc)


def read_record(data_dir: str) -> Record | None:
    """The record, or None when there is none, or it is torn, of another format or version."""
    try:
        fd = open_nofollow(os.path.join(data_dir, CHECKED_NAME), os.O_RDONLY)
    except JobsyncdError:
        return None
    try:
        raw = json.loads(os.read(fd, 4096))
        if raw["format"] != CHECK_FORMAT or raw["version"] != __version__:
            return None
        index = raw["index"]
        if index is not None and index["byteorder"] == sys.byteorder:
            index = IndexFile(int(index["chunks"]), int(index["size"]), int(index["crc"]))
        else:
            index = None
        return Record(int(raw["dev"]), int(raw["ino"]), int(raw["end"]), int(raw["crc"]), index)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # torn by a crash, or not ours: fold it all
    finally:
        os.close(fd)


def write_record(data_dir: str, record: Record) -> bool:
    """Write the record (not fsynced: lost or torn by a crash, the next pass folds the whole
    store); False when it cannot be written."""
    index = record.index_file
    raw = {
        "format": CHECK_FORMAT,
        "version": __version__,
        "dev": record.dev,
        "ino": record.ino,
        "end": record.end,
        "crc": record.crc,
        "index": None
        if index is None
        else {
            "chunks": index.chunks,
            "size": index.size,
            "crc": index.crc,
            "byteorder": sys.byteorder,
        },
    }
    try:
        write_file_atomically(data_dir, CHECKED_NAME, json.dumps(raw).encode())
    except JobsyncdError:
        return False
    return True


def forget(data_dir: str) -> None:
    try:
        os.unlink(os.path.join(data_dir, CHECKED_NAME))
    except OSError:
        pass


def encode_chunk(entries: Entries) -> bytes:
    # Ids of checked lines: 36 ASCII characters without b"\n" (storeformat.holdable_id).
    texts = ["\n".join(ids).encode() for ids in (entries.ids, entries.due, entries.purged)]
    import struct
    from array import array

    header = struct.pack(_HEADER_FORMAT, len(entries.ids), *map(len, texts))
    return header + b"".join(texts) + array("q", entries.offsets).tobytes()


def read_index(data_dir: str, index: IndexFile) -> bytes | None:
    """The bytes of the index the record names, if their CRC is the record's; else None."""
    try:
        fd = open_nofollow(os.path.join(data_dir, INDEX_NAME), os.O_RDONLY)
    except JobsyncdError:
        return None
    try:
        if not 0 <= index.size <= os.fstat(fd).st_size:
            return None  # a record that is not ours: never a read of what it claims
        data = os.pread(fd, index.size, 0) if index.size else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == index.size and crc32(data) == index.crc else None


def decode_index(data: bytes, index: IndexFile, end: int) -> Entries | None:
    """The entries of read_index()'s bytes for checked bytes [0, end); None when they are not
    as the record says (or describe other lines: an offset past `end`)."""
    entries = _decode_chunks(data, index.chunks)
    if entries is None:
        return None
    if entries.offsets and (min(entries.offsets) < -1 or max(entries.offsets) >= end):
        return None
    return entries


def read_checked_bytes(fd: int, record: Record) -> bytes | None:
    """The store's first `record.end` bytes (read through `fd`) if their CRC is the record's,
    else None. Both the read and the CRC leave the GIL: a thread does this beside other work."""
    try:
        if not 0 <= record.end <= os.fstat(fd).st_size:
            return None  # a record of another file, or not ours
        data = os.pread(fd, record.end, 0)
        while len(data) < record.end:  # a regular file's read stops short only at its end
            more = os.pread(fd, record.end - len(data), len(data))
            if not more:
                return None
            data += more
    except OSError:
        return None
    return data if crc32(data) == record.crc else None


def _decode_chunks(data: bytes, chunks: int) -> Entries | None:
    import struct
    from array import array

    entries = Entries()
    pos = 0
    for _ in range(chunks):
        if pos + _HEADER_SIZE > len(data):
            return None
        lines, *sizes = struct.unpack_from(_HEADER_FORMAT, data, pos)
        pos += _HEADER_SIZE
        lists = []
        for size in sizes:
            try:
                text = data[pos : pos + size].decode("ascii")
            except UnicodeDecodeError:
                return None
            lists.append(text.split("\n") if size else [])
            pos += size
        offsets = array("q")
        offsets.frombytes(data[pos : pos + 8 * lines])
        pos += 8 * lines
        if len(offsets) != lines or len(lists[0]) != lines:
            return None
        entries.extend(Entries(lists[0], offsets.tolist(), lists[1], lists[2]))
    return entries if pos == len(data) else None


def write_index(data_dir: str, chunks: list[bytes], after: IndexFile | None) -> IndexFile | None:
    """Write `chunks` after the `after` bytes of the index (None: the index anew); returns
    what it then holds, or None when it could not be written as asked (no index then)."""
    size = sum(map(len, chunks))
    crc = after.crc if after is not None else 0
    for chunk in chunks:
        crc = crc32(chunk, crc)
    if after is None:
        try:
            write_file_atomically(data_dir, INDEX_NAME, chunks)
        except JobsyncdError:
            return None
        return IndexFile(len(chunks), size, crc)
    try:
        fd = open_nofollow(os.path.join(data_dir, INDEX_NAME), os.O_WRONLY)
    except JobsyncdError:
        return None
    try:
        if os.fstat(fd).st_size < after.size:
            return None  # not the file the record described
        os.ftruncate(fd, after.size)
        os.lseek(fd, after.size, os.SEEK_SET)
        for chunk in chunks:
            write_all(fd, chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return IndexFile(after.chunks + len(chunks), after.size + size, crc)
