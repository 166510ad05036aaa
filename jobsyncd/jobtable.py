"""`JobTable`: the folded store, local_id -> Job, in which a job may be held as its raw line.

A store folded lazily (`Store.fold_lazily`, a sync pass) does not parse the lines already
checked (checked.py: lines exactly as this version writes them, under a CRC): the checked bytes
are held as one buffer, each job as the offset of its latest line in it, and a job is parsed the
first time it is asked for. Where each line is comes from the checked range's index (`Entries`,
kept beside the record), so a pass neither splits nor parses the 100,000 lines it does not need;
a pass of 1,000 edits parses the 1,000 lines appended since.

What a pass needs of every job (its server_id and its status: the deletion guard's count, the
index by server_id, the due jobs) is read from the raw line by the byte layout of
storeformat.py, without parsing it; a line where that is ambiguous is parsed. `values()` and
`items()` parse every raw line (in arrays, as a fold does), so code that wants every Job gets
exactly what an eager fold gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, ItemsView, Iterator, Mapping, MutableMapping, ValuesView
from itertools import accumulate, islice
from typing import Any, TypeVar, cast

from .errors import JobsyncdError
from .model import Job
from .storeformat import (
    DUE_NEEDLES,
    DUE_STATUSES,
    HEAD_LENGTH,
    PURGED_KEY,
    RECORD_HEAD,
    SERVER_ID_FIELD,
    STATUS_FIELD,
    holdable_id,
    valid_record,
)

# A line's id is bytes [_ID_AT, _ID_END); a job's line goes on with _JOB_TAIL, a tombstone's is
# _PURGED_TAIL; a job line's server_id value starts at _SID_AT.
_ID_AT = len(RECORD_HEAD)
_ID_END = HEAD_LENGTH - 1
_JOB_TAIL = b'"' + SERVER_ID_FIELD
_PURGED_TAIL = b'","' + PURGED_KEY.encode() + b'":true}'
_PURGED_LENGTH = _ID_END + len(_PURGED_TAIL)
# A job line's first _HEAD_SPAN bytes: RECORD_HEAD, the id, _JOB_TAIL; each byte but the id's
# as _HEAD_FIXED says, with _HEAD_QUOTES quotes in all (so none in the id).
_HEAD_SPAN = _ID_END + len(_JOB_TAIL)
_HEAD_TEMPLATE = RECORD_HEAD + b"-" * (_ID_END - _ID_AT) + _JOB_TAIL
_HEAD_FIXED = [
    (i, _HEAD_TEMPLATE[i : i + 1]) for i in range(_HEAD_SPAN) if not _ID_AT <= i < _ID_END
]
_HEAD_QUOTES = _HEAD_TEMPLATE.count(b'"')
_ID_LENGTH = _ID_END - _ID_AT
_SID_AT = HEAD_LENGTH + len(SERVER_ID_FIELD)
_STATUS_AT = len(STATUS_FIELD) + 1  # from a STATUS_FIELD hit to the status's first character
_STATUS_NEEDLE = STATUS_FIELD + b'"'
_PARSE_CHUNK = 4096  # raw lines parsed with one json.loads by values()
_PARSE_ALL_AFTER = 2000  # raw lines parsed one by one before the rest are parsed at once


class Entries:
    """Where the checked lines are (the index of a checked range, checked.py), in file order:
    each line's job id and offset in the store (-1 for a tombstone), and the ids among them
    whose line names a status that needs a push, and those that a tombstone drops."""

    __slots__ = ("ids", "offsets", "due", "purged")

    def __init__(
        self,
        ids: list[str] | None = None,
        offsets: list[int] | None = None,
        due: list[str] | None = None,
        purged: list[str] | None = None,
    ) -> None:
        self.ids: list[str] = ids if ids is not None else []
        self.offsets: list[int] = offsets if offsets is not None else []
        self.due: list[str] = due if due is not None else []
        self.purged: list[str] = purged if purged is not None else []

    def extend(self, more: Entries) -> None:
        self.ids += more.ids
        self.offsets += more.offsets
        self.due += more.due
        self.purged += more.purged


def index_lines(data: bytes, base: int = 0) -> Entries | None:
    """The Entries of `data`, whole lines of the store starting at its offset `base`; None when
    a line is not a job line or tombstone of the layout (storeformat.py) with a 36-character id
    free of quotes and backslashes (then a fold parses them; none enters a checked range)."""
    lines = data.split(b"\n")
    lines.pop()  # data ends with b"\n"
    count = len(lines)
    if not count:
        return Entries()
    # Each line's first 63 bytes, checked at C speed: the head, a 36-character ASCII id
    # without quote or backslash, and `","server_id":` (so no tombstone: those go line by
    # line). Position by position over all lines at once, then the ids split out.
    heads = b"".join([line[:_HEAD_SPAN] for line in lines])
    if (
        len(heads) != _HEAD_SPAN * count
        or heads.count(b'"') != _HEAD_QUOTES * count
        or b"\\" in heads
        or not heads.isascii()
        or any(heads[i::_HEAD_SPAN] != byte * count for i, byte in _HEAD_FIXED)
    ):
        return _index_line_by_line(lines, base)
    text = heads.decode()
    ids = [text[i : i + _ID_LENGTH] for i in range(_ID_AT, len(text), _HEAD_SPAN)]
    offsets = list(accumulate([len(line) + 1 for line in lines], initial=base))
    offsets.pop()
    return Entries(ids, offsets, due_ids(data, ids, lines))


def due_ids(data: bytes, ids: list[str], lines: list[bytes]) -> list[str]:
    """The ids of the lines of `data` (whole lines: `lines`, of jobs `ids`) that name a status
    needing a push (may_be_due parses only those). Few hits (a store after its sync): a byte
    search of the block for each needle, then the line each hit is on; many (the lines `create`
    and `update` appended): each line looked at."""
    hits = sum(data.count(needle) for needle in DUE_NEEDLES)
    if 8 * hits > len(lines):
        return [i for i, line in zip(ids, lines, strict=True) if _names_due(line)]
    due = []
    for needle in DUE_NEEDLES if hits else ():
        pos = data.find(needle)
        while pos != -1:
            start = data.rfind(b"\n", 0, pos) + 1
            due.append(data[start + _ID_AT : start + _ID_END].decode())
            pos = data.find(b"\n", pos)
            pos = data.find(needle, pos) if pos != -1 else -1
    return due


def _index_line_by_line(lines: list[bytes], base: int) -> Entries | None:
    """index_lines() line by line: tombstones, ids not of the usual form, other layouts."""
    entries = Entries()
    offset = base
    for line in lines:
        raw_id = line[_ID_AT:_ID_END]
        if not line.startswith(RECORD_HEAD) or line[_ID_END : _ID_END + 1] != b'"':
            return None
        if b'"' in raw_id or b"\\" in raw_id or not raw_id.isascii() or len(raw_id) != _ID_LENGTH:
            return None
        local_id = raw_id.decode()
        if len(line) == _PURGED_LENGTH and line.endswith(_PURGED_TAIL):
            entries.ids.append(local_id)
            entries.offsets.append(-1)
            entries.purged.append(local_id)
        elif line.startswith(_JOB_TAIL, _ID_END):
            entries.ids.append(local_id)
            entries.offsets.append(offset)
            if _names_due(line):
                entries.due.append(local_id)
        else:
            return None
        offset += len(line) + 1
    return entries


class JobTable(MutableMapping[str, Job]):
    """local_id -> Job; a value is a Job, or (a job not asked for yet) the offset of its line
    in the held buffer of checked lines (`hold`)."""

    __slots__ = (
        "_d",
        "_buf",
        "_raw",
        "_sums",
        "_maybe_due",
        "_singles",
        "watch",
        "new_bindings",
        "on_broken",
    )

    def __init__(self) -> None:
        self._d: dict[str, Job | int] = {}
        self._buf = b""  # the checked lines, whole (hold)
        self._raw = 0  # how many values are raw lines (offsets)
        # (server_id, sync_status) read from raw lines, kept: a pass asks for them several times
        self._sums: dict[str, tuple[str | None, str]] = {}
        self._maybe_due: set[str] = set()  # raw lines that name a status needing a push
        self._singles = 0  # raw lines parsed one by one (past _PARSE_ALL_AFTER: all at once)
        # While `watch`: whether a job was set with a server_id it did not hold before (the
        # store's one-binding check need not look at all jobs when none was).
        self.watch = False
        self.new_bindings = False
        # Called before a raw line that does not parse is reported (the store forgets that its
        # lines were checked, so that running again folds them all).
        self.on_broken: Callable[[], None] | None = None

    # ---- the mapping -----------------------------------------------------------------------
    def __getitem__(self, local_id: str) -> Job:
        value = self._d[local_id]
        if type(value) is int:
            return self._parse(local_id, value)
        return cast(Job, value)

    def get(  # type: ignore[override]
        self, local_id: str, default: Job | None = None
    ) -> Job | None:
        value = self._d.get(local_id)
        if value is None:
            return default
        if type(value) is int:
            return self._parse(local_id, value)
        return cast(Job, value)

    def __setitem__(self, local_id: str, job: Job) -> None:
        old = self._d.get(local_id)
        if type(old) is int:
            self._raw -= 1
            self._sums.pop(local_id, None)
            if self.watch and _server_id_of(self._line(old)) != job.server_id:
                self.new_bindings = True
        elif (
            self.watch
            and job.server_id is not None
            and (old is None or cast(Job, old).server_id != job.server_id)
        ):
            self.new_bindings = True
        self._d[local_id] = job

    def __delitem__(self, local_id: str) -> None:
        if type(self._d.pop(local_id)) is int:
            self._raw -= 1
            self._sums.pop(local_id, None)

    def discard(self, local_id: str) -> None:
        """Drop the job if held, without parsing its line (a tombstone)."""
        if local_id in self._d:
            del self[local_id]

    def pop(self, local_id: str, *default: Any) -> Any:
        if local_id not in self._d:
            if default:
                return default[0]
            raise KeyError(local_id)
        job = self[local_id]
        del self._d[local_id]
        return job

    def __contains__(self, local_id: object) -> bool:
        return local_id in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def values(self) -> ValuesView[Job]:
        self._parse_all()
        return cast(ValuesView[Job], self._d.values())

    def items(self) -> ItemsView[str, Job]:
        self._parse_all()
        return cast(ItemsView[str, Job], self._d.items())

    def plain(self) -> dict[str, Job] | None:
        """The dict itself when it holds parsed jobs only and nothing watches what is set (an
        eager fold): a caller may set Jobs in it directly, at dict speed. Else None."""
        if self._raw or self.watch:
            return None
        return cast(dict[str, Job], self._d)

    # ---- raw lines ---------------------------------------------------------------------------
    @property
    def raw_count(self) -> int:
        return self._raw

    def hold(self, buffer: bytes, entries: Entries) -> int:
        """Hold each job of `entries` (the index of `buffer`, whole lines a fold checked, from
        the store's start) as its latest line there, a tombstone dropping its job; returns how
        many lines. For an empty table only: one buffer per table."""
        if self._d:
            raise ValueError("hold() fills an empty table")
        d: dict[str, Any] = dict(zip(entries.ids, entries.offsets, strict=True))
        for local_id in entries.purged:
            if d.get(local_id) == -1:  # its last line is a tombstone
                del d[local_id]
        self._d, self._buf, self._raw = d, buffer, len(d)
        self._maybe_due.update(entries.due)
        return len(entries.ids)

    def _line(self, offset: int) -> bytes:
        return _line_at(self._buf, offset)

    def ids_holdable(self) -> bool:
        """Whether every job's id may be held raw (storeformat.holdable_id): those held raw
        are, as their lines were checked."""
        return all(holdable_id(k) for k, v in self._d.items() if type(v) is not int)

    def in_order(self, size: int) -> Iterator[tuple[list[str], list[Job | bytes]]]:
        """The jobs, `size` at a time: their ids, and each as a Job or, held raw, its line (a
        compaction writes that as it is)."""
        buf = self._buf
        end = buf.index
        items = iter(self._d.items())
        while chunk := list(islice(items, size)):
            held = [buf[v : end(b"\n", v)] if type(v) is int else cast(Job, v) for _, v in chunk]
            yield [k for k, _ in chunk], held

    def summaries(self) -> Iterator[tuple[str, str | None, str]]:
        """(local_id, server_id, sync_status) of every job, read from a raw line's bytes (a line
        where that is ambiguous is parsed)."""
        sums = self._sums
        for local_id, value in self._d.items():  # a parse replaces a value: no resize
            if type(value) is int:
                summary = sums.get(local_id)
                if summary is None:
                    summary = _summary(self._line(value))
                    if summary is not None:
                        sums[local_id] = summary
                if summary is None:
                    job = self._parse(local_id, value)
                    yield local_id, job.server_id, job.sync_status
                else:
                    yield local_id, summary[0], summary[1]
            else:
                job = cast(Job, value)
                yield local_id, job.server_id, job.sync_status

    def snapshot(self) -> Snapshot:
        """The server ids and statuses of the jobs now, worked out when first asked for: the
        parsed jobs' now (those with a server_id), the raw lines' from the lines themselves."""
        if self._raw:
            # Mostly raw lines (a lazy fold): a copy of the dict, the few Jobs in it included
            # (a Job in the table is replaced, never changed in place; the buffer never changes).
            return Snapshot([], dict(self._d), dict(self._sums), self._buf)
        # All parsed (a first sync of 100,000 jobs): no reference kept to the Jobs, which the
        # pass replaces one by one, only their ids and statuses.
        parsed: list[tuple[str, str | None, str]] = [
            (local_id, job.server_id, job.sync_status)
            for local_id, job in cast(dict[str, Job], self._d).items()
            if job.server_id is not None
        ]
        return Snapshot(parsed, {}, {}, b"")

    def may_be_due(self) -> Iterator[Job]:
        """The parsed jobs, and the raw ones whose line names a status that needs a push: a
        superset of the due jobs (the caller decides with rules.is_due)."""
        for local_id in sorted(self._maybe_due):
            offset = self._d.get(local_id)
            if type(offset) is int and _names_due(self._line(offset)):
                self._parse(local_id, offset)
        self._maybe_due.clear()  # parsed now, or their lines name no such status
        for value in self._d.values():
            if type(value) is not int:
                yield cast(Job, value)

    def due_ids(self, limit: int) -> list[str] | None:
        """The ids of the jobs whose status needs a push (pending, pending_deletion, error);
        None when more than `limit` are, or may be (then no raw line is parsed)."""
        if len(self._maybe_due) > limit:
            return None
        due = [j.local_id for j in self.may_be_due() if j.sync_status in DUE_STATUSES]
        return due if len(due) <= limit else None

    # ---- parsing -----------------------------------------------------------------------------
    def _parse(self, local_id: str, offset: int) -> Job:
        self._singles += 1
        if self._singles > _PARSE_ALL_AFTER and self._raw > _PARSE_ALL_AFTER:
            # A pass that asks for this many jobs one by one (a full resync reads every job
            # back) is cheaper served by parsing them all as an eager fold does.
            self._parse_all()
            return cast(Job, self._d[local_id])
        return self._parse_one(local_id, self._line(offset))

    def _parse_one(self, local_id: str, line: bytes) -> Job:
        try:
            job = _job_of(local_id, json.loads(line))
        except ValueError:
            job = None
        if job is None:
            # Cannot happen for bytes a fold checked under the same CRC; said, never guessed at.
            if self.on_broken is not None:
                self.on_broken()
            raise JobsyncdError(f"job {local_id}: its stored line no longer parses; run again")
        self._d[local_id] = job
        self._raw -= 1
        self._sums.pop(local_id, None)
        return job

    def _parse_all(self) -> None:
        if not self._raw:
            return
        line = self._line
        raw = [(k, line(v)) for k, v in self._d.items() if type(v) is int]
        for first in range(0, len(raw), _PARSE_CHUNK):
            chunk = raw[first : first + _PARSE_CHUNK]
            try:
                recs = json.loads(b"[" + b",".join(line for _, line in chunk) + b"]")
            except ValueError:
                recs = None
            if recs is None or len(recs) != len(chunk):
                for local_id, one in chunk:
                    self._parse_one(local_id, one)  # raises for the line that does not parse
                continue
            for (local_id, one), rec in zip(chunk, recs, strict=True):
                job = _job_of(local_id, rec)
                if job is None:
                    self._parse_one(local_id, one)  # raises with the message
                    continue
                self._d[local_id] = job
                self._raw -= 1
        self._sums.clear()


class Snapshot:
    """What JobTable.snapshot() took: summaries() as the table's were then."""

    def __init__(
        self,
        parsed: list[tuple[str, str | None, str]],
        held: dict[str, Job | int],
        known: dict[str, tuple[str | None, str]],
        buffer: bytes,
    ) -> None:
        self._parsed, self._held, self._known, self._buf = parsed, held, known, buffer

    def summaries(self) -> Iterator[tuple[str, str | None, str]]:
        """(local_id, server_id, sync_status), leaving out parsed jobs without a server_id."""
        yield from self._parsed
        known, buf = self._known, self._buf
        for local_id, value in self._held.items():
            if type(value) is not int:
                job = cast(Job, value)
                yield local_id, job.server_id, job.sync_status
                continue
            # What the table had read from these very lines, else from the bytes, else parsed.
            summary = known.get(local_id)
            if summary is None:
                line = _line_at(buf, value)
                summary = _summary(line)
                if summary is None:
                    job = Job.from_record(json.loads(line))
                    summary = job.server_id, job.sync_status
            yield local_id, summary[0], summary[1]


K = TypeVar("K")
V = TypeVar("V")


class LazyDict(Mapping[K, V]):
    """A dict made by `make()` the first time it is read (a pass that never needs its index
    by server_id, or its count of synced jobs, never builds them)."""

    def __init__(self, make: Callable[[], dict[K, V]]) -> None:
        self._make: Callable[[], dict[K, V]] | None = make
        self._dict: dict[K, V] = {}

    def _built(self) -> dict[K, V]:
        if self._make is not None:
            self._dict, self._make = self._make(), None
        return self._dict

    def __getitem__(self, key: K) -> V:
        return self._built()[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())


def _line_at(buffer: bytes, offset: int) -> bytes:
    """The held line that starts at `offset` (without its b"\\n")."""
    return buffer[offset : buffer.index(b"\n", offset)]


def _job_of(local_id: str, rec: Any) -> Job | None:
    """The Job of a held line's parse, if it is a valid job record of that very id."""
    try:
        job = Job.from_record(rec) if valid_record(rec) else None
    except TypeError:
        return None
    return job if job is not None and job.local_id == local_id else None


def _names_due(line: bytes) -> bool:
    """Whether a raw line names a status that needs a push (maybe in its metadata)."""
    return any(needle in line for needle in DUE_NEEDLES)


def _server_id_of(line: bytes) -> str | None | bool:
    """The server_id of a job line of our layout from its bytes; False when in doubt."""
    if not line.startswith(_JOB_TAIL, _ID_END):
        return False  # the server_id is not the second key
    if line.startswith(b"null", _SID_AT):
        return None
    end = line.find(b'"', _SID_AT + 1)
    if end == -1 or line[_SID_AT : _SID_AT + 1] != b'"':
        return False
    raw_sid = line[_SID_AT + 1 : end]
    return False if b"\\" in raw_sid else raw_sid.decode()


def _summary(line: bytes) -> tuple[str | None, str] | None:
    """(server_id, sync_status) of a job line of our layout, read from its bytes; None when the
    bytes leave a doubt (an escape in the server_id, metadata naming "sync_status")."""
    server_id = _server_id_of(line)
    if type(server_id) is bool:
        return None
    at = line.find(_STATUS_NEEDLE, _SID_AT)
    if at == -1 or line.find(_STATUS_NEEDLE, at + 1) != -1:
        return None
    start = at + _STATUS_AT
    end = line.find(b'"', start)
    if end == -1:
        return None
    return server_id, line[start:end].decode()
