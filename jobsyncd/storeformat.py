"""The store's line format (`jobs.jsonl`) and the byte scanner that finds jobs in it unparsed.

The layout: each record is one line of compact JSON (no spaces, UTF-8, non-ASCII unescaped)
ended by b"\\n", and each line starts with its job's id, a job's with its server_id next:

    {"local_id":"<36 characters>","server_id":null,"text":...,"sync_status":"pending",...}
    {"local_id":"<36 characters>","purged":true}

JSON escapes every newline and quote inside a string, and no byte of a multi-byte UTF-8
character is b"\\n" or b'"', so a raw b"\\n" only ever ends a record and RECORD_HEAD at a line's
start only ever begins one. That is what the scanner relies on to find a job's lines by a byte
search for its head, to read a line's job from its first HEAD_LENGTH bytes, and to find each line
that may hold a due status by a search for DUE_NEEDLES. It holds because `Job.record()` and
`Job.record_json()` (model.py) write local_id first and server_id second in compact JSON;
tests/test_storeformat.py checks it on generated jobs, so reordering those keys fails a test
instead of the scanner. A needle is only a lead (metadata may name "sync_status" too): each job
found is confirmed by parsing its latest line, and a line not of this layout makes a search
answer None (fold the store and see). Imports `model` only: the CLI's local commands load it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from .model import STATUSES, Job, SyncStatus, compact_json

# ---- the layout ----------------------------------------------------------------------------

FIRST_KEY = "local_id"
SECOND_KEY = "server_id"  # a job's; a tombstone's second key is PURGED_KEY
STATUS_KEY = "sync_status"
PURGED_KEY = "purged"
LOCAL_ID_LENGTH = 36  # a UUID as text (model.new_local_id); the scanner reads no other length

RECORD_HEAD = b'{"' + FIRST_KEY.encode() + b'":"'  # b'{"local_id":"'
# A line's head through the closing quote of its id: b'{"local_id":"<36 characters>"'.
HEAD_LENGTH = len(RECORD_HEAD) + LOCAL_ID_LENGTH + 1
# What follows a job's head: its server_id, as JSON (null or a string), then a comma.
SERVER_ID_FIELD = b',"' + SECOND_KEY.encode() + b'":'
STATUS_FIELD = b'"' + STATUS_KEY.encode() + b'":'

# The statuses that need a push (the pass decides when: sync.rules.is_due).
DUE_STATUSES = (
    SyncStatus.PENDING.value,
    SyncStatus.PENDING_DELETION.value,
    SyncStatus.ERROR.value,
)


def _needles(statuses: tuple[str, ...]) -> tuple[bytes, ...]:
    # One search of the file per needle: a status that another begins with is searched without
    # its closing quote and so finds both ("pending" finds "pending_deletion").
    needles = []
    for status in statuses:
        if any(status.startswith(s) for s in statuses if s != status):
            continue  # found by the shorter one's needle
        extended = any(s.startswith(status) for s in statuses if s != status)
        needles.append(STATUS_FIELD + b'"' + status.encode() + (b"" if extended else b'"'))
    return tuple(needles)


DUE_NEEDLES = _needles(DUE_STATUSES)  # (b'"sync_status":"pending', b'"sync_status":"error"')
SYNCED_NEEDLE = STATUS_FIELD + b'"' + SyncStatus.SYNCED.value.encode() + b'"'
HEAD_AT_LINE_START = re.compile(
    rb"(?m)^" + re.escape(RECORD_HEAD) + rb'[^"\n]{%d}"' % LOCAL_ID_LENGTH
)

SCAN_BLOCK = 4 << 20  # bytes read at a time by a scan of many lines (last_lines)
FEW_HEADS = 8  # more due-named jobs than this are resolved by one scan (last_lines)


# ---- encoding ------------------------------------------------------------------------------


def encode_record(record: dict[str, Any]) -> bytes:
    """One record as its line. A job's comes from `Job.record()`, whose key order makes the
    layout (local_id first, server_id second)."""
    return compact_json(record).encode() + b"\n"


def encode_lines(jobs: Iterable[Job], tombstones: Iterable[dict[str, Any]] = ()) -> bytes:
    """The lines of `jobs` (`Job.record_json`, the fast way to the same bytes) and then of
    `tombstones`, as one blob; b"" for none."""
    lines = [j.record_json() for j in jobs]
    lines += [compact_json(t) for t in tombstones]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def encode_held(held: Iterable[Job | bytes]) -> list[bytes]:
    """The lines (without b"\\n") of jobs some of which are held as their raw lines
    (jobtable.py), which are written as they are."""
    return [j if isinstance(j, bytes) else j.record_json().encode() for j in held]


def tombstone(local_id: str) -> dict[str, Any]:
    return {FIRST_KEY: local_id, PURGED_KEY: True}


def valid_record(rec: Any) -> bool:
    """Whether a parsed line is a record a fold can use (a job's or a tombstone)."""
    if not isinstance(rec, dict) or not isinstance(rec.get(FIRST_KEY), str):
        return False
    if rec.get(PURGED_KEY) is True:
        return True
    return (
        rec.get(STATUS_KEY) in STATUSES
        and isinstance(rec.get("metadata", {}), dict)
        and isinstance(rec.get("text", ""), str)
    )


def holdable(line: bytes, rec: dict[str, Any]) -> bool:
    """Whether a lazy fold may hold `line` unparsed (jobtable.py), `rec` being its parse: the
    line is exactly what this version writes for it (a job's record_json, a tombstone as
    tombstone() makes it, so no space, escape, key or order of another writer), with a
    36-character id free of quotes and backslashes. Only such lines enter a checked range."""
    try:
        if not holdable_id(rec[FIRST_KEY]):
            return False
        if rec.get(PURGED_KEY) is True:
            return line == compact_json(tombstone(rec[FIRST_KEY])).encode()
        return Job.from_record(rec).record_json().encode() == line
    except (KeyError, TypeError, ValueError, UnicodeError):
        return False


def holdable_id(local_id: str) -> bool:
    """Whether a line of a job with this id can be holdable (see holdable)."""
    return (
        len(local_id) == LOCAL_ID_LENGTH
        and local_id.isascii()
        and local_id.isprintable()
        and '"' not in local_id
        and "\\" not in local_id
    )


def head_of(local_id: str) -> bytes:
    """The bytes every line of `local_id` starts with (HEAD_LENGTH of them for a UUID)."""
    return RECORD_HEAD[:-1] + json.dumps(local_id).encode()


def local_id_in(head: bytes) -> str:
    """The id in a head of our layout (HEAD_LENGTH bytes starting with RECORD_HEAD)."""
    return head[len(RECORD_HEAD) : len(RECORD_HEAD) + LOCAL_ID_LENGTH].decode()


def is_head(head: bytes) -> bool:
    """Whether a line's first HEAD_LENGTH bytes are a head of our layout."""
    return head.startswith(RECORD_HEAD) and head[HEAD_LENGTH - 1 : HEAD_LENGTH] == b'"'


# ---- reading the file ----------------------------------------------------------------------


class FileView:
    """The first `size` bytes of an open file, searched like bytes (find, rfind, slices, len)
    by positioned reads: each search reads chunks that start small (a line's end is near) and
    double up to 1 MiB, so a whole-file search copies the file once in 1 MiB pieces."""

    FIRST_CHUNK = 4096
    MAX_CHUNK = 1 << 20

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> bytes:
        start, stop, step = index.indices(self.size)
        if step != 1:
            raise ValueError("FileView slices have no step")
        return os.pread(self.fd, stop - start, start) if stop > start else b""

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = self.size if end is None else min(end, self.size)
        pos, chunk = max(start, 0), self.FIRST_CHUNK
        while pos + len(sub) <= end:
            stop = min(pos + chunk + len(sub) - 1, end)
            found = os.pread(self.fd, stop - pos, pos).find(sub)
            if found != -1:
                return pos + found
            if stop == end:
                return -1
            pos += chunk
            chunk = min(2 * chunk, self.MAX_CHUNK)
        return -1

    def rfind(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = self.size if end is None else min(end, self.size)
        start, chunk = max(start, 0), self.FIRST_CHUNK
        while end - start >= len(sub):
            lo = max(start, end - chunk - len(sub) + 1)
            found = os.pread(self.fd, end - lo, lo).rfind(sub)
            if found != -1:
                return lo + found
            if lo == start:
                return -1
            end = lo + len(sub) - 1
            chunk = min(2 * chunk, self.MAX_CHUNK)
        return -1


# The functions below take `data`: bytes or a FileView of the store's bytes.


def line_at(data: Any, pos: int) -> tuple[int, int]:
    """Where the line holding byte `pos` starts and ends (its b"\\n", or the data's end)."""
    start = data.rfind(b"\n", 0, pos) + 1
    end = data.find(b"\n", pos)
    return start, (len(data) if end == -1 else end)


def record_at(data: Any, start: int, local_id: str) -> dict[str, Any] | None:
    """The valid record of `local_id` on the line at `start`, else None."""
    stop = data.find(b"\n", start)
    if stop == -1:
        return None  # a torn last line
    try:
        rec = json.loads(data[start:stop])
    except ValueError:
        return None
    return rec if valid_record(rec) and rec[FIRST_KEY] == local_id else None


def latest_record(data: Any, head: bytes, local_id: str) -> dict[str, Any] | None:
    """The job's latest valid record, searched from the end of the file backwards (`head` is
    its line's start, head_of(local_id)): a job changed lately is found without reading the
    rest; a torn or unreadable line is passed over, as a load would."""
    end = len(data)
    while True:
        pos = data.rfind(b"\n" + head, 0, end)
        if pos != -1:
            start = pos + 1
        elif data[: len(head)] == head:
            start = 0
        else:
            return None
        stop = data.find(b"\n", start)
        if stop != -1:  # else a torn last line
            try:
                rec = json.loads(data[start:stop])
            except ValueError:
                rec = None
            if valid_record(rec) and rec[FIRST_KEY] == local_id:
                return dict(rec)
        if start == 0:
            return None
        end = pos


def due_candidates(
    data: Any,
    limit: int,
    max_checks: int | None = None,
    start: int = 0,
    known: Iterable[str] = (),
    few_heads: int = FEW_HEADS,
) -> list[str] | None:
    """The local_ids whose latest line has a status that needs a push, by byte search from
    `start` (the jobs `known` to be due before it are checked too); None when more than `limit`
    are due, more than `max_checks` (4 x limit) jobs name such a status, or a line is not of
    our layout."""
    max_checks = 4 * limit if max_checks is None else max_checks
    heads: dict[bytes, int | None] = {}  # each job's head -> where its first hit starts
    for head, line_start in due_heads(data, start, known):
        if head is None:
            return None  # a line not of our layout
        if head not in heads:
            heads[head] = line_start
            if len(heads) > max_checks:
                return None
    hits = [p for p in heads.values() if p is not None]
    # A few jobs (a create while the daemon idles): each found backwards from the end. Many (a
    # first sync, a backlog): one scan from the first hit finds every one's last line, instead
    # of one scan of the file per job.
    lasts = last_lines(data, set(heads), min(hits)) if len(hits) > few_heads else {}
    found: list[str] = []
    for head in heads:
        local_id = local_id_in(head)
        rec = record_at(data, lasts[head], local_id) if head in lasts else None
        if rec is None:
            rec = latest_record(data, head, local_id)
        if rec is not None and rec.get(STATUS_KEY) in DUE_STATUSES:
            found.append(local_id)
            if len(found) > limit:
                return None
    return found


def last_lines(data: Any, heads: set[bytes], begin: int) -> dict[bytes, int]:
    """Where the last line of each of `heads` at or after `begin` (a line's start) starts, by
    one scan in blocks of whole lines."""
    last: dict[bytes, int] = {}
    pos, size = begin, len(data)
    while pos < size:
        block = data[pos : pos + SCAN_BLOCK]
        cut = len(block)
        if pos + cut < size:
            cut = block.rfind(b"\n") + 1 or cut  # whole lines (a longer line: cut anywhere)
        for match in HEAD_AT_LINE_START.finditer(block, 0, cut):
            if match.group(0) in heads:
                last[match.group(0)] = pos + match.start()
        pos += cut
    return last


def due_heads(
    data: Any, start: int, known: Iterable[str]
) -> Iterator[tuple[bytes | None, int | None]]:
    """The heads of the jobs `known` to be due (where: None), then of each line from `start`
    that names a due status, with where that line starts; (None, None) for a line that is not
    of our layout."""
    for local_id in known:
        yield head_of(local_id), None
    for needle in DUE_NEEDLES:
        pos = data.find(needle, start)
        while pos != -1:
            line_start, end = line_at(data, pos)
            head = data[line_start : line_start + HEAD_LENGTH]
            if not is_head(head):
                yield None, None
                return
            yield head, line_start
            pos = data.find(needle, end)


def ids_with_prefix(data: Any, prefix: str) -> set[str]:
    """The local_ids that start with `prefix` (lowercase hex and dashes) on any line, live or
    not (a line's start is the file's start or follows a b"\\n")."""
    needle = b"\n" + RECORD_HEAD + prefix.encode()
    found = set()
    if data[: len(needle) - 1] == needle[1:]:
        found.add(local_id_in(data[:HEAD_LENGTH]))
    pos = data.find(needle)
    while pos != -1:
        found.add(local_id_in(data[pos + 1 : pos + 1 + HEAD_LENGTH]))
        pos = data.find(needle, pos + 1)
    return found


def ids_naming_server_id(data: Any, server_id: str) -> Iterator[str]:
    """The local_id of each line whose server_id is `server_id` (a job's latest line may not
    be one of them: check it)."""
    needle = b'"' + SERVER_ID_FIELD + json.dumps(server_id, ensure_ascii=False).encode() + b","
    pos = data.find(needle)
    while pos != -1:
        start = data.rfind(b"\n", 0, pos) + 1
        # The needle right after a head's id: the server_id field, not a text that quotes one.
        if data[start : start + len(RECORD_HEAD)] == RECORD_HEAD and pos == start + HEAD_LENGTH - 1:
            yield data[start + len(RECORD_HEAD) : pos].decode()
        pos = data.find(needle, pos + 1)


def synced_ids(data: Any, excluded: set[str], enough: int, max_checks: int) -> set[str] | None:
    """The ids of jobs other than `excluded` whose latest record is `synced`, newest lines
    first, until `enough` are found; None when a line is not of our layout or more than
    `max_checks` lines had to be looked at."""
    found: set[str] = set()
    checks = 0
    pos = data.rfind(SYNCED_NEEDLE)  # newest lines first: most likely still current
    while pos != -1 and len(found) < enough:
        start, _ = line_at(data, pos)
        head = data[start : start + HEAD_LENGTH]
        if not is_head(head):
            return None
        checks += 1
        if checks > max_checks:
            return None
        local_id = local_id_in(head)
        if local_id not in found and local_id not in excluded:
            # Parsed, not searched: the needle may be a metadata key's, not the job's status.
            rec = latest_record(data, head, local_id)
            if rec is not None and rec.get(STATUS_KEY) == SyncStatus.SYNCED.value:
                found.add(local_id)
        pos = data.rfind(SYNCED_NEEDLE, 0, start)
    return found
