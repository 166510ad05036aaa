"""The job record, its sync statuses and pure helpers (no I/O).

A `Job` is what the user sees (the keys of contract section 1) plus the bookkeeping the store and
the sync pass need (`rev`, `base`, `create_sent`), which never reaches `--json` output.
"""

from __future__ import annotations

import datetime as _dt
import json
import operator
import os
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol


class SyncStatus(str, Enum):
    PENDING = "pending"
    SYNCED = "synced"
    PENDING_DELETION = "pending_deletion"
    ERROR = "error"
    FAILED = "failed"


STATUSES = tuple(s.value for s in SyncStatus)

# The keys of a job object in `--json` output, in the contract's order (section 1).
PUBLIC_KEYS = (
    "local_id",
    "server_id",
    "text",
    "audio_file",
    "metadata",
    "server_status",
    "sync_status",
    "retry_count",
    "last_sync_attempt_at",
    "last_error",
    "created_at",
    "updated_at",
)


_FIELDS: tuple[tuple[str, Any], ...] = (
    ("local_id", None),
    ("server_id", None),
    ("text", ""),
    ("audio_file", None),
    ("metadata", dict),
    ("server_status", None),
    ("sync_status", "pending"),
    ("retry_count", 0),
    ("last_sync_attempt_at", None),
    ("last_error", None),
    ("created_at", ""),
    ("updated_at", ""),
    # Bookkeeping, never shown to users:
    # rev counts local (user) changes; the pass compares it to detect edits made during a push.
    ("rev", 0),
    # base: what the server held after the last sync ({"text", "metadata"}), so that a PATCH
    # carries only the fields changed since; None before the first sync.
    ("base", None),
    # create_sent: a POST may have reached the server, so a delete must find the server copy.
    ("create_sent", False),
    # audio_sent: the managed audio file the server has (path), to know when audio changed.
    ("audio_sent", None),
    # error_kind: "delete" when an errored/failed job was a deletion ("retry" puts it back
    # there), "gone" when the server lost it (404 on PATCH: "retry" creates it again).
    ("error_kind", None),
    # next_attempt_at: when a job in `error` is due again (backoff with jitter, fixed at failure).
    ("next_attempt_at", None),
    # A resumable upload of the job's audio in progress (contract 6.8): its URL, the audio file
    # it is for, and the offset the server last confirmed.
    ("upload_url", None),
    ("upload_for", None),
    ("upload_offset", 0),
)
FIELD_NAMES = tuple(name for name, _ in _FIELDS)
_FIELD_SET = frozenset(FIELD_NAMES)


class Job:
    """One job. A plain slotted class rather than a dataclass: `dataclasses` imports `inspect`,
    and generating the class costs more start-up time than all of `jobsyncd create` may add."""

    # `base` lives in `_base`; a record's "=" (the same as its text and metadata, the usual case
    # for a synced job) is kept as a (text, metadata) tuple of the very objects loaded, a third
    # of the size of a dict: 100,000 jobs hold ~16 MiB less. Reassigning text or metadata later
    # leaves the tuple as it was, as a base must.
    __slots__ = tuple("_base" if n == "base" else n for n in FIELD_NAMES)

    local_id: str
    server_id: str | None
    text: str
    audio_file: str | None
    metadata: dict[str, Any]
    server_status: str | None
    sync_status: str
    retry_count: int
    last_sync_attempt_at: str | None
    last_error: str | None
    created_at: str
    updated_at: str
    rev: int
    _base: dict[str, Any] | tuple[str, dict[str, Any]] | None
    create_sent: bool
    audio_sent: str | None
    error_kind: str | None
    next_attempt_at: str | None
    upload_url: str | None
    upload_for: str | None
    upload_offset: int

    def __init__(self, local_id: str, **fields: Any) -> None:
        unknown = set(fields) - _FIELD_SET
        if unknown:
            raise TypeError(f"unknown job fields: {sorted(unknown)}")
        self.local_id = local_id
        for name, default in _FIELDS[1:]:
            if name in fields:
                setattr(self, name, fields[name])
            else:
                setattr(self, name, default() if default is dict else default)

    @property
    def base(self) -> dict[str, Any] | None:
        base = self._base
        if type(base) is tuple:
            return {"text": base[0], "metadata": base[1]}
        return base  # type: ignore[return-value]

    @base.setter
    def base(self, value: dict[str, Any] | None) -> None:
        self._base = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and self.record() == other.record()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Job({self.local_id!r}, sync_status={self.sync_status!r}, server_id={self.server_id!r})"

    def public(self) -> dict[str, Any]:
        return dict(zip(PUBLIC_KEYS, _public_values(self), strict=True))

    def record(self) -> dict[str, Any]:
        """The store's line for this job: the public keys (local_id first, server_id second),
        then the bookkeeping that differs from its default. `base` is "=" when it equals the
        job's own text and metadata (the usual case for a synced job): smaller lines fold faster."""
        rec = {k: getattr(self, k) for k in PUBLIC_KEYS}
        rec["rev"] = self.rev
        base = self.base
        if base is not None:
            same = (
                len(base) == 2
                and base.get("text") == self.text
                and base.get("metadata") == self.metadata
            )
            rec["base"] = "=" if same else base
        if self.create_sent:
            rec["create_sent"] = True
        if self.audio_sent is not None:
            rec["audio_sent"] = self.audio_sent
        if self.error_kind is not None:
            rec["error_kind"] = self.error_kind
        if self.next_attempt_at is not None:
            rec["next_attempt_at"] = self.next_attempt_at
        if self.upload_url is not None:
            rec["upload_url"] = self.upload_url
            rec["upload_for"] = self.upload_for
            rec["upload_offset"] = self.upload_offset
        return rec

    def record_json(self) -> str:
        """compact_json(self.record()) in a third of the time (a sync pass writes every job it
        pushes twice): the line written straight from the fields when they have their usual
        types (a property test holds the two equal)."""
        lid, sid, text, audio, meta, sst, sync, count, att, err, cat, uat = _public_values(self)
        rev, base = self.rev, self._base
        if not (
            type(lid) is str
            and type(text) is str
            and type(sync) is str
            and type(cat) is str
            and type(uat) is str
            and type(count) is int
            and type(rev) is int
            and type(meta) is dict
            and type(base) in _BASE_TYPES
            and type(sid) in _STR_OR_NONE
            and type(audio) in _STR_OR_NONE
            and type(sst) in _STR_OR_NONE
            and type(att) in _STR_OR_NONE
            and type(err) in _STR_OR_NONE
        ):
            return compact_json(self.record())
        q = _quote
        line = (
            f'{{"local_id":{q(lid)},"server_id":{"null" if sid is None else q(sid)},'
            f'"text":{q(text)},"audio_file":{"null" if audio is None else q(audio)},'
            f'"metadata":{compact_json(meta)},'
            f'"server_status":{"null" if sst is None else q(sst)},"sync_status":{q(sync)},'
            f'"retry_count":{count},"last_sync_attempt_at":{"null" if att is None else q(att)},'
            f'"last_error":{"null" if err is None else q(err)},"created_at":{q(cat)},'
            f'"updated_at":{q(uat)},"rev":{rev}'
        )
        if base is not None:
            if isinstance(base, tuple):
                same = base[0] == text and (base[1] is meta or base[1] == meta)
            else:
                same = len(base) == 2 and base.get("text") == text and base.get("metadata") == meta
            line += ',"base":"="' if same else ',"base":' + compact_json(self.base)
        if self.create_sent:
            line += ',"create_sent":true'
        if self.audio_sent is not None:
            line += ',"audio_sent":' + compact_json(self.audio_sent)
        if self.error_kind is not None:
            line += ',"error_kind":' + compact_json(self.error_kind)
        if self.next_attempt_at is not None:
            line += ',"next_attempt_at":' + compact_json(self.next_attempt_at)
        if self.upload_url is not None:
            line += (
                f',"upload_url":{compact_json(self.upload_url)},'
                f'"upload_for":{compact_json(self.upload_for)},'
                f'"upload_offset":{compact_json(self.upload_offset)}'
            )
        return line + "}"

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Job:
        job = _from_record(rec)
        if not isinstance(job.local_id, str) or not isinstance(job.metadata, dict):
            raise TypeError("not a job record")
        return job

    def clone(self) -> Job:
        """A new job object with the same values, sharing `metadata` and `base` (never changed
        in place anywhere: an edit assigns a new object). For a version about to be written."""
        return _clone(self)

    def as_stored(self) -> Job:
        """This job made what folding its record() gives back, without parsing it: the
        bookkeeping a record leaves out reset, a base equal to its own values kept as the
        compact tuple, statuses interned. For a job nobody holds to change afterwards."""
        base = self._base
        if (
            type(base) is dict
            and len(base) == 2
            and base.get("text") == self.text
            and base.get("metadata") == self.metadata
        ):
            self._base = (self.text, self.metadata)
        if self.upload_url is None:
            self.upload_for, self.upload_offset = None, 0
        self.create_sent = bool(self.create_sent)
        if type(self.sync_status) is str:
            self.sync_status = sys.intern(self.sync_status)
        if type(self.server_status) is str:
            self.server_status = sys.intern(self.server_status)
        if type(self.error_kind) is str:
            self.error_kind = sys.intern(self.error_kind)
        return self

    def copy(self) -> Job:
        """A copy sharing nothing mutable with this job (a pass copies every job it pushes)."""
        job = _clone(self)
        metadata = job.metadata = copy_json(self.metadata)
        base = self._base
        if type(base) is tuple:
            # A base equal to the job's own values stays a tuple, now of the copy's objects.
            job._base = (base[0], metadata if base[1] is self.metadata else copy_json(base[1]))
        elif base is not None:
            job._base = copy_json(base)
        return job


_SCALARS: frozenset[type] = frozenset((str, int, float, bool, type(None)))


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value: several times faster than a json round trip (a pass of
    100,000 jobs copies each of them more than once)."""
    try:
        return _copy_json(value)
    except RecursionError:  # nested deeper than Python's stack: the C codec goes further
        return json.loads(json.dumps(value))


def _copy_json(value: Any, scalars: frozenset[type] = _SCALARS) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: v if type(v) in scalars else _copy_json(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in scalars else _copy_json(v) for v in value]
    return value


_public_values = operator.attrgetter(*PUBLIC_KEYS)


def _not_serialisable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# What json.dumps(value, separators=(",", ":"), ensure_ascii=False) runs, made once rather than
# for every call: a third of the cost of a store record, and a first sync of 100,000 jobs
# writes 200,000 of them. No circular check: these values are trees of JSON values.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_encoders = (
    {
        allow_nan: _c_make_encoder(
            None,
            _not_serialisable,
            json.encoder.encode_basestring,
            None,
            ":",
            ",",
            False,
            False,
            allow_nan,
        )
        for allow_nan in (False, True)
    }
    if _c_make_encoder is not None
    else None
)


_quote = json.encoder.encode_basestring  # a str as JSON, as compact_json writes it
_BASE_TYPES = frozenset((type(None), tuple, dict))
_STR_OR_NONE = frozenset((str, type(None)))


def compact_json(value: Any, allow_nan: bool = True) -> str:
    """`json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)`,
    faster."""
    if _encoders is None:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)
    return "".join(_encoders[allow_nan](value, 0))


def _make_from_record() -> Callable[[dict[str, Any]], Job]:
    # Straight-line attribute stores, generated once: folding 100,000 records this way is
    # several times faster than a setattr loop, and slots keep each job small in memory.
    # The few values that repeat across jobs (statuses) are interned: one string, not 100,000.
    lines = [
        "def from_record(rec, new=Job.__new__, Job=Job, intern=intern, str=str):",
        "    j = new(Job)",
        "    get = rec.get",
    ]
    interned = ("sync_status", "server_status", "error_kind")
    for name, default in _FIELDS:
        value = "{}" if default is dict else repr(default)
        slot = "_base" if name == "base" else name
        if name in interned:
            lines.append(f"    v = get({name!r}, {value})")
            lines.append(f"    j.{slot} = intern(v) if type(v) is str else v")
        else:
            lines.append(f"    j.{slot} = get({name!r}, {value})")
    lines.append("    if j._base == '=':")
    lines.append("        j._base = (j.text, j.metadata)")
    # A job never edited has one timestamp twice: one string (100,000 jobs: 7 MiB less).
    lines.append("    if j.updated_at == j.created_at:")
    lines.append("        j.updated_at = j.created_at")
    lines.append("    return j")
    namespace: dict[str, Any] = {"Job": Job, "intern": sys.intern}
    exec("\n".join(lines), namespace)  # noqa: S102 - code built from our own constants
    from_record: Callable[[dict[str, Any]], Job] = namespace["from_record"]
    return from_record


_from_record = _make_from_record()


def _make_clone() -> Callable[[Job], Job]:
    # A shallow copy in straight-line attribute copies, as for from_record: 4x a getattr loop.
    lines = ["def clone(job, new=Job.__new__, Job=Job):", "    j = new(Job)"]
    lines += [f"    j.{slot} = job.{slot}" for slot in Job.__slots__]
    lines.append("    return j")
    namespace: dict[str, Any] = {"Job": Job}
    exec("\n".join(lines), namespace)  # noqa: S102 - code built from our own constants
    clone: Callable[[Job], Job] = namespace["clone"]
    return clone


_clone = _make_clone()


def new_local_id() -> str:
    """A random (version 4) UUID, formatted as uuid.uuid4() would (without importing uuid)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    import uuid

    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def rfc3339(moment: _dt.datetime) -> str:
    """RFC 3339 UTC with a `Z`, millisecond precision, four-digit year: 2026-11-23T18:02:29.123Z.

    Formatted by hand: `strftime("%Y")` writes the year 1 as "1" on glibc (contract 6.9)."""
    m = moment.astimezone(_dt.timezone.utc)
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}."
        f"{m.microsecond // 1000:03d}Z"
    )


MIN_YEAR, MAX_YEAR = 1970, 9999


def parse_rfc3339(text: str) -> _dt.datetime:
    """An aware UTC datetime; ValueError for anything that is not RFC 3339 with a zone in the
    years 1970-9999 (a server's `0001-01-01T00:00:00+01:00` would overflow on conversion)."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("not a timestamp")
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = _dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without a zone: {text!r}")
    if not MIN_YEAR <= moment.year <= MAX_YEAR:
        raise ValueError(f"timestamp outside the years {MIN_YEAR}-{MAX_YEAR}: {text!r}")
    try:
        moment = moment.astimezone(_dt.timezone.utc)
    except OverflowError:
        raise ValueError(f"timestamp out of range: {text!r}") from None
    if not MIN_YEAR <= moment.year <= MAX_YEAR:
        raise ValueError(f"timestamp outside the years {MIN_YEAR}-{MAX_YEAR}: {text!r}")
    return moment


def parse_meta_value(raw: str) -> Any:
    """`--meta KEY=VALUE`: VALUE as JSON when it parses, else the string itself."""
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return raw
    return value if _finite(value) else raw  # 1e400 parses as infinity: not JSON either


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return value - value == 0.0  # false for inf and nan
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _not_json(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity are not JSON: taken as the string itself


def parse_meta(pair: str) -> tuple[str, Any]:
    """Split at the first `=`; raises ValueError on a pair without one or with an empty key."""
    key, sep, raw = pair.partition("=")
    if not sep:
        raise ValueError(f"--meta {pair!r} is not KEY=VALUE")
    if not key:
        raise ValueError(f"--meta {pair!r} has an empty KEY")
    return key, parse_meta_value(raw)


class RandomSource(Protocol):
    """What backoff needs of a random generator: `random.Random`, or a fixed one in tests."""

    def random(self) -> float: ...


def backoff_delay(
    base_seconds: float, retry_count: int, rng: RandomSource | None = None
) -> float:
    """Seconds until a job in `error` is due again: between half and all of base * 2^(n-1).

    "Equal jitter" (AWS Architecture Blog, "Exponential Backoff and Jitter"): never sooner than half
    the nominal delay, so a burst of failures spreads out without retrying at once.
    """
    if base_seconds <= 0 or retry_count <= 0:
        return 0.0
    nominal = base_seconds * (1 << min(retry_count - 1, 30))  # 2**n, typed int (n >= 0 here)
    if rng is None:
        import random

        rng = random.Random()
    r = rng.random()
    return nominal / 2 + r * nominal / 2
