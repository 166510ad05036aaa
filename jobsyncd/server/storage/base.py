"""The storage contract of the reference server, written once for both engines (SQLite and
PostgreSQL): jobs, the per-user change log, tombstones, ETags, cursors and checkpoints.

Every write takes the user's row in `collections` first (`_bump`): that row's `version` is the
user's change counter, and holding its lock until commit serialises the user's writers, so the
counter order is the commit order (a reader who has seen change N has seen every change before
it; a sequence taken by concurrent transactions could commit out of order). A job row carries the
counter of its latest change (`change_seq`), a deleted job leaves a tombstone with the counter of
its deletion. An engine supplies connections and transactions (`_read`, `_write`), how text is
stored, and how other processes learn of a commit (`_wait`).
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import datetime as _dt
import hashlib
import hmac
import itertools
import json
import operator
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from jobsyncd.server.storage.audio import StoredAudio
from jobsyncd.server.storage.waiters import Waiters

NEW_JOB_STATUS = "submitted"
SECONDS_PER_DAY = 86400.0

# The job columns every read selects, in job_json's order; change_seq last.
COLUMNS = (
    "seq, id, local_id, text, metadata, status, audio_filename, audio_size, audio_sha256, "
    "created_at, updated_at, change_seq"
)


class StorageError(Exception):
    """The database cannot be used (unreachable, from a newer release, no driver)."""


class StorageBusy(StorageError):
    """The database stayed locked longer than the server waits: try again later (503)."""


class CheckpointExpired(Exception):
    """The checkpoint is older than the tombstones kept: deletions after it may be gone."""


class CheckpointDiverged(Exception):
    """The checkpoint is not one of this database's history (restored, replaced, garbled)."""


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds and a `Z`, as jobsyncd.model writes them."""
    moment = _dt.datetime.now(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Cursor(Protocol):
    @property  # read-only: sqlite3.Cursor's rowcount cannot be assigned
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """One transaction: `execute` takes SQL with `?` placeholders on every engine."""

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Cursor: ...

    def abort(self) -> None:
        """Roll back instead of committing when the block ends (it changed nothing)."""


@dataclasses.dataclass
class ChangesPage:
    changes: list[str]  # job JSON texts and tombstones, oldest change first
    next_seq: int  # the counter the next checkpoint stands for
    more: bool
    version: int  # the user's counter when this page was read


class SQLStorage(abc.ABC):
    """Jobs of every user in one database; every method is safe to call from any thread."""

    description: str  # what to show at start: a path, or a URL without its password

    def __init__(self) -> None:
        self.waiters = Waiters()
        self._secret = b""
        self._epoch = ""
        self.history = ""
        self._watch_lock = threading.Lock()
        self._flights = SingleFlight()

    def _load_meta(self) -> None:
        with self._read() as tx:
            meta = dict(tx.execute("SELECT key, value FROM server_meta").fetchall())
        self._secret = bytes.fromhex(meta["cursor_secret"])
        self._epoch = meta["etag_epoch"]
        self.history = meta["history_id"]

    # -- what an engine supplies ------------------------------------------------------------

    @abc.abstractmethod
    def _read(self) -> AbstractContextManager[Tx]:
        """A read-only transaction that sees one snapshot."""

    @abc.abstractmethod
    def _write(self, user: str | None = None) -> AbstractContextManager[Tx]:
        """A write transaction; after its commit, the change of `user` reaches the long-polls."""

    @abc.abstractmethod
    def _text_in(self, value: str | None) -> Any:
        """A text or status as the engine stores it."""

    @abc.abstractmethod
    def _text_json(self, stored: Any) -> str:
        """A stored text or status as JSON text."""

    @abc.abstractmethod
    def _listen(self) -> None:
        """Make sure changes committed by other processes wake this process's waiters."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def _bump(self, tx: Tx, user: str) -> int:
        """Take the user's counter (and its row lock, held until commit) and return its new
        value: every create, change and delete calls this first."""
        row = tx.execute(
            'INSERT INTO collections ("user", version) VALUES (?, 1) '
            'ON CONFLICT ("user") DO UPDATE SET version = collections.version + 1 '
            "RETURNING version",
            (user,),
        ).fetchone()
        return int(row[0])

    # -- JSON -------------------------------------------------------------------------------

    def job_json(self, row: tuple[Any, ...]) -> str:
        """One job row as its API JSON text; metadata is stored as JSON text and spliced in."""
        _seq, job_id, local_id, text, metadata, status, a_file, a_size, a_sha, created, updated = (
            row[:11]
        )
        if a_file is None:
            audio = "null"
        else:
            audio = f'{{"filename":{json.dumps(a_file)},"size":{a_size},"sha256":"{a_sha}"}}'
        return (
            f'{{"id":"{job_id}","local_id":"{local_id}","text":{self._text_json(text)},'
            f'"metadata":{metadata},"status":{self._text_json(status)},"audio":{audio},'
            f'"created_at":"{created}","updated_at":"{updated}"}}'
        )

    # -- ETags, cursors, checkpoints ---------------------------------------------------------

    @staticmethod
    def _version(tx: Tx, user: str) -> tuple[int, int]:
        row = tx.execute(
            'SELECT version, purged_seq FROM collections WHERE "user" = ?', (user,)
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def _etag_of(self, version: int) -> str:
        return f'"{self._epoch}-{version}"'

    def etag(self, user: str) -> str:
        """The listing's ETag: changes whenever any job of `user` changes."""
        return self._etag_of(self.current_version(user))

    def current_version(self, user: str) -> int:
        with self._read() as tx:
            return self._version(tx, user)[0]

    def _mac(self, kind: bytes, user: str, payload: bytes) -> bytes:
        message = kind + user.encode("utf-8", "surrogatepass") + b"\0" + payload
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:12]

    def make_cursor(self, user: str, seq: int) -> str:
        # The listing's cursor predates the change log: its layout stays as it was.
        payload = seq.to_bytes(8, "big")
        raw = payload + self._mac(b"", user, payload)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def read_cursor(self, user: str, cursor: str) -> int | None:
        """The seq a cursor of this user stands for, or None for one this server did not issue."""
        raw = _unpack(cursor, 20)
        if raw is None or not hmac.compare_digest(raw[8:], self._mac(b"", user, raw[:8])):
            return None
        return int.from_bytes(raw[:8], "big")

    def make_checkpoint(self, user: str, seq: int) -> str:
        """Opaque: the history id, the counter, and a MAC so that no other server's (or user's)
        checkpoint reads as one of ours."""
        payload = bytes.fromhex(self.history) + seq.to_bytes(8, "big")
        raw = payload + self._mac(b"changes\0", user, payload)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def read_checkpoint(self, user: str, checkpoint: str) -> int:
        """The counter a checkpoint stands for; CheckpointDiverged when it is not this history's."""
        raw = _unpack(checkpoint, 36)
        if raw is None:
            raise CheckpointDiverged("not a checkpoint of this server")
        payload, mac = raw[:24], raw[24:]
        if not hmac.compare_digest(mac, self._mac(b"changes\0", user, payload)):
            raise CheckpointDiverged("not a checkpoint of this server")
        if payload[:16].hex() != self.history:
            raise CheckpointDiverged("the checkpoint comes from another history of this database")
        return int.from_bytes(payload[16:], "big")

    # -- the listing and single jobs ---------------------------------------------------------

    def list_page(self, user: str, after_seq: int, limit: int) -> tuple[str, list[str], int | None]:
        """(ETag, job JSON texts, last seq when more may follow) read in one snapshot."""
        with self._read() as tx:
            version = self._version(tx, user)[0]
            rows = tx.execute(
                f'SELECT {COLUMNS} FROM jobs WHERE "user" = ? AND seq > ? ORDER BY seq LIMIT ?',
                (user, after_seq, limit + 1),
            ).fetchall()
        more = len(rows) > limit
        if more:
            del rows[limit:]
        return (
            self._etag_of(version),
            [self.job_json(r) for r in rows],
            (rows[-1][0] if more else None),
        )

    def get_job(self, user: str, job_id: str) -> str | None:
        with self._read() as tx:
            row = tx.execute(
                f'SELECT {COLUMNS} FROM jobs WHERE "user" = ? AND id = ?', (user, job_id)
            ).fetchone()
        return None if row is None else self.job_json(row)

    def find_local(self, user: str, local_id: str) -> str | None:
        """The user's job created under `local_id` (JSON), or None."""
        with self._read() as tx:
            row = tx.execute(
                f'SELECT {COLUMNS} FROM jobs WHERE "user" = ? AND local_id = ?', (user, local_id)
            ).fetchone()
        return None if row is None else self.job_json(row)

    def exists(self, user: str, job_id: str) -> bool:
        with self._read() as tx:
            row = tx.execute(
                'SELECT 1 FROM jobs WHERE "user" = ? AND id = ?', (user, job_id)
            ).fetchone()
        return row is not None

    # -- writes -----------------------------------------------------------------------------

    def create_job(
        self,
        user: str,
        local_id: str,
        text: str | None,
        metadata: dict[str, Any],
        audio: StoredAudio | None,
    ) -> tuple[str, bool]:
        """(job JSON, created). A local_id the user already has gives the existing job, unchanged
        (the user's lock and the UNIQUE (user, local_id) constraint make that hold for concurrent
        repeats too)."""
        select = f'SELECT {COLUMNS} FROM jobs WHERE "user" = ? AND local_id = ?'
        with self._write(user) as tx:
            row = tx.execute(select, (user, local_id)).fetchone()
            if row is not None:
                tx.abort()
                return self.job_json(row), False
            version = self._bump(tx, user)
            now = utc_now()
            cursor = tx.execute(
                'INSERT INTO jobs (id, "user", local_id, text, metadata, status, audio_name, '
                "audio_filename, audio_size, audio_sha256, created_at, updated_at, change_seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                'ON CONFLICT ("user", local_id) DO NOTHING',
                (
                    str(uuid.uuid4()),
                    user,
                    local_id,
                    self._text_in(text),
                    json.dumps(metadata, separators=(",", ":")),
                    self._text_in(NEW_JOB_STATUS),
                    audio and audio.name,
                    audio and audio.filename,
                    audio and audio.size,
                    audio and audio.sha256,
                    now,
                    now,
                    version,
                ),
            )
            created = cursor.rowcount == 1
            if not created:
                tx.abort()  # a repeat that raced past the first look: nothing changed
            row = tx.execute(select, (user, local_id)).fetchone()
        return self.job_json(row), created

    def update_job(
        self, user: str, job_id: str, changes: dict[str, Any], audio: StoredAudio | None
    ) -> tuple[str | None, str | None]:
        """(job JSON or None when unknown, the replaced audio file's name to remove).
        `changes["audio"] = None` removes the job's audio (`audio` must then be None)."""
        sets: list[str] = []
        params: list[Any] = []
        if "text" in changes:
            sets.append("text = ?")
            params.append(self._text_in(changes["text"]))
        if "metadata" in changes:
            sets.append("metadata = ?")
            params.append(json.dumps(changes["metadata"], separators=(",", ":")))
        if "status" in changes:
            sets.append("status = ?")
            params.append(self._text_in(changes["status"]))
        if audio is not None:
            sets.append("audio_name = ?, audio_filename = ?, audio_size = ?, audio_sha256 = ?")
            params.extend((audio.name, audio.filename, audio.size, audio.sha256))
        elif "audio" in changes:
            sets.append(
                "audio_name = NULL, audio_filename = NULL, audio_size = NULL, audio_sha256 = NULL"
            )
        with self._write(user) as tx:
            # The lock first: the audio name read below is then the one this update replaces.
            version = self._bump(tx, user) if sets else 0
            old = tx.execute(
                'SELECT audio_name FROM jobs WHERE "user" = ? AND id = ?', (user, job_id)
            ).fetchone()
            if old is None or not sets:
                tx.abort()
            if old is None:
                return None, None
            if sets:
                tx.execute(
                    f"UPDATE jobs SET {', '.join(sets)}, updated_at = ?, change_seq = ? "
                    'WHERE "user" = ? AND id = ?',
                    (*params, utc_now(), version, user, job_id),
                )
            row = tx.execute(
                f'SELECT {COLUMNS} FROM jobs WHERE "user" = ? AND id = ?', (user, job_id)
            ).fetchone()
        replaced = audio is not None or "audio" in changes
        return self.job_json(row), (old[0] if replaced else None)

    def delete_job(self, user: str, job_id: str) -> tuple[bool, str | None]:
        """(deleted, the job's audio file name to remove). The job leaves a tombstone."""
        with self._write(user) as tx:
            version = self._bump(tx, user)
            row = tx.execute(
                'DELETE FROM jobs WHERE "user" = ? AND id = ? RETURNING audio_name, local_id',
                (user, job_id),
            ).fetchone()
            if row is None:
                tx.abort()
                return False, None
            tx.execute(
                'INSERT INTO tombstones (id, "user", local_id, change_seq, deleted_at) '
                "VALUES (?, ?, ?, ?, ?)",
                (job_id, user, row[1], version, time.time()),
            )
        return True, row[0]

    # -- batches ----------------------------------------------------------------------------

    def apply_batch(
        self, user: str, operations: list[tuple[Any, ...]]
    ) -> tuple[list[tuple[int, str | None]], list[str]]:
        """Apply checked operations in order, in one transaction: ("create", local_id, text,
        metadata as stored JSON), ("update", job_id, changes with metadata as stored JSON) or
        ("delete", job_id). Returns one (status, job JSON or None) per operation, as its own
        request would have answered, and the audio file names to remove after the commit. Each
        change gets its own counter value, so that a page boundary of the feed never falls
        between two changes of the same value."""
        results: list[tuple[int, str | None]] = []
        unlinked: list[str] = []
        with self._write(user) as tx:
            counter = _Counter(self, tx, user)
            # Consecutive operations of one kind go together, a few statements for the run.
            for kind, same in itertools.groupby(operations, key=operator.itemgetter(0)):
                run = list(same)
                if kind == "create":
                    results += self._create_many(tx, user, run, counter)
                elif kind == "update":
                    results += self._update_many(tx, user, run, counter, unlinked)
                elif kind == "delete":
                    results += self._delete_many(tx, user, run, counter, unlinked)
            if counter.used:
                counter.finish()
            else:
                tx.abort()  # nothing changed: no new counter value, no new ETag
        return results, unlinked

    def _create_many(
        self, tx: Tx, user: str, creates: list[tuple[Any, ...]], counter: _Counter
    ) -> list[tuple[int, str | None]]:
        """A run of creates in two statements: which local_ids exist, then one insert of the
        new ones. Their answers are written from the values inserted, not read back."""
        # The user's lock first: no other writer of this user commits a create from here on,
        # so the look-up below stays true until the insert (PostgreSQL reads committed rows).
        counter.peek()
        local_ids = list(dict.fromkeys(op[1] for op in creates))
        existing = {row[2]: row for row in self._jobs_by_local_id(tx, user, local_ids)}
        fresh: list[tuple[Any, ...]] = []
        now = utc_now()
        status = self._text_in(NEW_JOB_STATUS)
        ids = iter(new_job_ids(len(local_ids) - len(existing)))
        for _, local_id, text, metadata_json in creates:
            if local_id in existing:
                continue
            row = (0, next(ids), local_id, self._text_in(text), metadata_json, status)
            existing[local_id] = (*row, None, None, None, now, now)
            fresh.append((*row[1:], counter.next()))
        missed = self._insert_jobs(tx, user, now, fresh) if fresh else set()
        if missed:
            # Stored by another writer after all (a database without the lock above): theirs.
            for row in self._jobs_by_local_id(tx, user, list(missed)):
                existing[row[2]] = row
        made = {row[1] for row in fresh} - missed
        results: list[tuple[int, str | None]] = []
        for _, local_id, *_rest in creates:
            # The first create of a local_id new to the server is 201; a repeat, 200.
            results.append((201 if local_id in made else 200, self.job_json(existing[local_id])))
            made.discard(local_id)
        return results

    def _jobs_by_local_id(self, tx: Tx, user: str, local_ids: list[str]) -> list[Any]:
        marks = ", ".join("?" * len(local_ids))
        return tx.execute(
            f'SELECT {COLUMNS} FROM jobs WHERE "user" = ? AND local_id IN ({marks})',
            (user, *local_ids),
        ).fetchall()

    def _insert_jobs(
        self, tx: Tx, user: str, now: str, rows: list[tuple[Any, ...]]
    ) -> set[str]:
        """Insert (id, local_id, text, metadata, status, change_seq) rows; returns the local_ids
        that were not inserted because the user has them already."""
        params: list[Any] = []
        for job_id, local_id, text, metadata, status, seq in rows:
            params += (job_id, user, local_id, text, metadata, status, now, now, seq)
        inserted = tx.execute(
            'INSERT INTO jobs (id, "user", local_id, text, metadata, status, created_at, '
            "updated_at, change_seq) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows))
            + ' ON CONFLICT ("user", local_id) DO NOTHING RETURNING local_id',
            params,
        ).fetchall()
        return {row[1] for row in rows} - {r[0] for r in inserted}

    def _update_many(
        self,
        tx: Tx,
        user: str,
        updates: list[tuple[Any, ...]],
        counter: _Counter,
        unlinked: list[str],
    ) -> list[tuple[int, str | None]]:
        """A run of updates in a few statements (which jobs exist, one update of them all, a
        read of those given no change), not one or two per operation. A run that names a job
        twice goes in parts that name each job once, in order."""
        results: list[tuple[int, str | None]] = []
        part: list[tuple[Any, ...]] = []
        named: set[str] = set()
        for operation in updates:
            if operation[1] in named:
                results += self._update_part(tx, user, part, counter, unlinked)
                part, named = [], set()
            part.append(operation)
            named.add(operation[1])
        return results + self._update_part(tx, user, part, counter, unlinked)

    def _update_part(
        self,
        tx: Tx,
        user: str,
        part: list[tuple[Any, ...]],
        counter: _Counter,
        unlinked: list[str],
    ) -> list[tuple[int, str | None]]:
        counter.peek()  # the user's lock first: the jobs read below stay as read
        audio = dict(self._audio_by_id(tx, user, [op[1] for op in part]))
        rows = []
        for _, job_id, changes in part:
            if job_id in audio and changes:
                text, status = changes.get("text"), changes.get("status")
                rows.append(
                    (
                        job_id,
                        "text" in changes,
                        self._text_in(text) if "text" in changes else None,
                        "metadata" in changes,
                        changes.get("metadata"),
                        "status" in changes,
                        self._text_in(status) if "status" in changes else None,
                        "audio" in changes,
                        counter.next(),
                    )
                )
        found = {row[1]: row for row in self._update_jobs(tx, user, utc_now(), rows)} if rows else {}
        unchanged = [op[1] for op in part if op[1] in audio and not op[2]]
        if unchanged:
            found.update((row[1], row) for row in self._jobs_by_id(tx, user, unchanged))
        results: list[tuple[int, str | None]] = []
        for _, job_id, changes in part:
            row = found.get(job_id)
            if row is None:
                results.append((404, None))
                continue
            results.append((200, self.job_json(row)))
            if "audio" in changes and audio[job_id]:
                unlinked.append(audio[job_id])
        return results

    def _delete_many(
        self,
        tx: Tx,
        user: str,
        deletes: list[tuple[Any, ...]],
        counter: _Counter,
        unlinked: list[str],
    ) -> list[tuple[int, str | None]]:
        """A run of deletes in two statements: one delete of them all, one insert of their
        tombstones. A job named twice is deleted by the first, and 404 for the second."""
        counter.peek()
        gone = {
            row[0]: row
            for row in self._delete_jobs(tx, user, list(dict.fromkeys(op[1] for op in deletes)))
        }
        tombstones = []
        results: list[tuple[int, str | None]] = []
        now = time.time()
        for _, job_id in deletes:
            row = gone.pop(job_id, None)
            if row is None:
                results.append((404, None))
                continue
            tombstones.append((job_id, row[2], counter.next(), now))
            results.append((204, None))
            if row[1]:
                unlinked.append(row[1])
        if tombstones:
            self._insert_tombstones(tx, user, tombstones)
        return results

    # The statements of the batch runs, in SQLite's SQL (PostgreSQL has its own with arrays).
    # `+"user"` in a look-up of ids: the term uses no index, so each id is found by its unique
    # index. Without the `+`, SQLite (which keeps no statistics here) reads every job of the
    # user through (user, change_seq) to pick out the ids: 45-70 ms a batch at 100,000 jobs.

    def _audio_by_id(self, tx: Tx, user: str, job_ids: list[str]) -> list[Any]:
        """(id, audio_name) of the user's jobs among `job_ids`."""
        marks = ", ".join("?" * len(job_ids))
        return tx.execute(
            f'SELECT id, audio_name FROM jobs WHERE +"user" = ? AND id IN ({marks})',
            (user, *job_ids),
        ).fetchall()

    def _jobs_by_id(self, tx: Tx, user: str, job_ids: list[str]) -> list[Any]:
        marks = ", ".join("?" * len(job_ids))
        return tx.execute(
            f'SELECT {COLUMNS} FROM jobs WHERE +"user" = ? AND id IN ({marks})', (user, *job_ids)
        ).fetchall()

    def _update_jobs(
        self, tx: Tx, user: str, now: str, rows: list[tuple[Any, ...]]
    ) -> list[Any]:
        """Apply (id, has text, text, has metadata, metadata, has status, status, drop audio,
        change_seq) rows, one job each; returns the updated jobs' rows. Here one statement per
        row, the same one each time (SQLite runs in process: a statement costs no round trip,
        and its UPDATE ... FROM a list of rows is slower than that)."""
        sql = (
            "UPDATE jobs SET "
            "text = CASE WHEN ?2 THEN ?3 ELSE text END, "
            "metadata = CASE WHEN ?4 THEN ?5 ELSE metadata END, "
            "status = CASE WHEN ?6 THEN ?7 ELSE status END, "
            "audio_name = CASE WHEN ?8 THEN NULL ELSE audio_name END, "
            "audio_filename = CASE WHEN ?8 THEN NULL ELSE audio_filename END, "
            "audio_size = CASE WHEN ?8 THEN NULL ELSE audio_size END, "
            "audio_sha256 = CASE WHEN ?8 THEN NULL ELSE audio_sha256 END, "
            'updated_at = ?10, change_seq = ?9 WHERE "user" = ?11 AND id = ?1 '
            f"RETURNING {COLUMNS}"
        )
        updated = []
        for row in rows:
            updated += tx.execute(sql, (*row, now, user)).fetchall()
        return updated

    def _delete_jobs(self, tx: Tx, user: str, job_ids: list[str]) -> list[Any]:
        """Delete the user's jobs among `job_ids`; (id, audio_name, local_id) of each."""
        marks = ", ".join("?" * len(job_ids))
        return tx.execute(
            f'DELETE FROM jobs WHERE +"user" = ? AND id IN ({marks}) '
            "RETURNING id, audio_name, local_id",
            (user, *job_ids),
        ).fetchall()

    def _insert_tombstones(self, tx: Tx, user: str, rows: list[tuple[Any, ...]]) -> None:
        """(id, local_id, change_seq, deleted_at) rows."""
        params: list[Any] = []
        for job_id, local_id, seq, deleted_at in rows:
            params += (job_id, user, local_id, seq, deleted_at)
        tx.execute(
            'INSERT INTO tombstones (id, "user", local_id, change_seq, deleted_at) VALUES '
            + ", ".join(["(?, ?, ?, ?, ?)"] * len(rows)),
            params,
        )

    # -- the change feed --------------------------------------------------------------------

    def changes(self, user: str, since: int | None, limit: int) -> ChangesPage:
        """The user's changes after counter `since` (None: from the beginning), oldest first, a
        job once as its latest change, read in one snapshot. Raises CheckpointDiverged for a
        checkpoint ahead of the last change, CheckpointExpired for one older than the kept
        tombstones.

        Identical reads in flight at once share one query: a change wakes every long-poll of
        its user together, and 500 of them need one read, not 500. A read that joined one begun
        just before a commit may miss that change; the long-poll loop then sees the counter
        moved and reads again."""
        page: ChangesPage = self._flights.do(
            (user, since, limit), lambda: self._changes(user, since, limit)
        )
        return page

    def _changes(self, user: str, since: int | None, limit: int) -> ChangesPage:
        with self._read() as tx:
            version, purged = self._version(tx, user)
            if since is not None and since > version:
                raise CheckpointDiverged("the checkpoint is ahead of this database's last change")
            if since is not None and since < purged:
                raise CheckpointExpired("the checkpoint is older than the tombstones kept")
            after = -1 if since is None else since
            jobs = tx.execute(
                f'SELECT {COLUMNS} FROM jobs WHERE "user" = ? AND change_seq > ? '
                "ORDER BY change_seq LIMIT ?",
                (user, after, limit + 1),
            ).fetchall()
            dead = tx.execute(
                'SELECT change_seq, id, local_id FROM tombstones WHERE "user" = ? '
                "AND change_seq > ? ORDER BY change_seq LIMIT ?",
                (user, after, limit + 1),
            ).fetchall()
        merged = sorted(
            [(row[11], self.job_json(row)) for row in jobs]
            + [(seq, _tombstone(job_id, local_id)) for seq, job_id, local_id in dead]
        )
        more = len(merged) > limit
        if more:
            del merged[limit:]
            next_seq = merged[-1][0]
        else:
            next_seq = max(version, after, 0)
        return ChangesPage([text for _, text in merged], next_seq, more, version)

    def wait_for_change(self, user: str, version: int, timeout: float) -> None:
        """Return when the user's counter is no longer `version`, or after `timeout` seconds."""
        waiter = self.waiters.arm(user, version)
        try:
            self._listen()
            if self.current_version(user) != version:
                return
            waiter.event.wait(timeout)
        finally:
            self.waiters.disarm(user, waiter)

    # -- upkeep -----------------------------------------------------------------------------

    def purge_tombstones(self, keep_days: float) -> int:
        """Remove tombstones older than `keep_days` and remember, per user, the newest counter
        removed: a checkpoint older than that has missed a deletion (expired). Returns how many."""
        cutoff = time.time() - keep_days * SECONDS_PER_DAY
        with self._write() as tx:
            # One statement: a tombstone committed meanwhile is either removed and counted here,
            # or left for the next purge.
            gone = tx.execute(
                'DELETE FROM tombstones WHERE deleted_at <= ? RETURNING "user", change_seq',
                (cutoff,),
            ).fetchall()
            newest: dict[str, int] = {}
            for user, seq in gone:
                newest[user] = max(newest.get(user, 0), int(seq))
            for user, seq in sorted(newest.items()):
                tx.execute(
                    'UPDATE collections SET purged_seq = ? WHERE "user" = ? AND purged_seq < ?',
                    (seq, user, seq),
                )
        return len(gone)

    def new_history(self) -> str:
        """Give the database a new history id (after a restore): every checkpoint given out
        before reads as diverged. The ETag epoch is renewed too: the restored counters are
        handed out again, and an ETag from after the backup would otherwise name another
        listing (an agent would get a 304 for a listing that changed)."""
        history, epoch = secrets_hex(16), secrets_hex(4)
        with self._write() as tx:
            tx.execute("UPDATE server_meta SET value = ? WHERE key = 'history_id'", (history,))
            tx.execute("UPDATE server_meta SET value = ? WHERE key = 'etag_epoch'", (epoch,))
        self.history, self._epoch = history, epoch
        return history


# The SET of a batch's update of many jobs from a row source `v` (see _update_jobs): each
# field changes only where its row says so; the change time is a parameter.
BATCH_UPDATE_SET = (
    "UPDATE jobs SET "
    "text = CASE WHEN v.ht THEN v.vt ELSE jobs.text END, "
    "metadata = CASE WHEN v.hm THEN v.vm ELSE jobs.metadata END, "
    "status = CASE WHEN v.hs THEN v.vs ELSE jobs.status END, "
    "audio_name = CASE WHEN v.ha THEN NULL ELSE jobs.audio_name END, "
    "audio_filename = CASE WHEN v.ha THEN NULL ELSE jobs.audio_filename END, "
    "audio_size = CASE WHEN v.ha THEN NULL ELSE jobs.audio_size END, "
    "audio_sha256 = CASE WHEN v.ha THEN NULL ELSE jobs.audio_sha256 END, "
    "updated_at = ?, change_seq = v.vseq "
)


class _Flight:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class SingleFlight:
    """Concurrent calls with the same key run the function once and share its result (the
    pattern of Go's singleflight package)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Any, _Flight] = {}

    def do(self, key: Any, function: Any) -> Any:
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if leader:
            try:
                flight.result = function()
            except BaseException as e:
                flight.error = e
            finally:
                with self._lock:
                    del self._flights[key]
                flight.done.set()
        else:
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.result


class _Counter:
    """The user's change counter within one batch: the first use takes the lock (_bump, which
    already counts one), later values count on locally, and `finish` stores the last one."""

    def __init__(self, storage: SQLStorage, tx: Tx, user: str) -> None:
        self._storage = storage
        self._tx = tx
        self._user = user
        self._first = 0
        self._next = 0

    @property
    def used(self) -> bool:
        return self._next > self._first

    def peek(self) -> int:
        if not self._first:
            self._first = self._next = self._storage._bump(self._tx, self._user)
        return self._next

    def next(self) -> int:
        value = self.peek()
        self._next += 1
        return value

    def finish(self) -> None:
        if self._next - 1 > self._first:
            self._tx.execute(
                'UPDATE collections SET version = ? WHERE "user" = ?', (self._next - 1, self._user)
            )


def new_job_ids(count: int) -> list[str]:
    """`count` new job ids: time-ordered UUIDs (version 7, RFC 9562) made in bulk. A batch's
    rows then go to the end of the id index, not to 500 random pages of it, which a database
    of 100,000 jobs would have to write back at every commit (a batch took 3x as long)."""
    prefix = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    raw = bytearray(os.urandom(16 * count))
    for at in range(0, 16 * count, 16):
        raw[at : at + 6] = prefix
        raw[at + 6] = (raw[at + 6] & 0x0F) | 0x70
        raw[at + 8] = (raw[at + 8] & 0x3F) | 0x80
    text = raw.hex()
    return [
        f"{text[i : i + 8]}-{text[i + 8 : i + 12]}-{text[i + 12 : i + 16]}-"
        f"{text[i + 16 : i + 20]}-{text[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


def secrets_hex(nbytes: int) -> str:
    import secrets

    return secrets.token_hex(nbytes)


def _tombstone(job_id: str, local_id: str) -> str:
    return f'{{"id":"{job_id}","local_id":"{local_id}","deleted":true}}'


def _unpack(token: str, size: int) -> bytes | None:
    """The bytes of a base64url token without padding, or None when it is not exactly that."""
    if len(token) != (size * 8 + 5) // 6 or not token.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        return None
    if len(raw) != size or base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != token:
        return None
    return raw


def iter_statements(script: str) -> Iterator[str]:
    for statement in script.split(";"):
        if statement.strip():
            yield statement
