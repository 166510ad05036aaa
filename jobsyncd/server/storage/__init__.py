"""The reference server's storage: jobs in SQLite, audio files in a directory.

SQLite runs in WAL mode with one connection per thread. The schema version lives in
`PRAGMA user_version` so a later release can migrate. Each user's collection has a change counter,
bumped in the same transaction as every create, change and delete; it is the listing's ETag.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

from jobsyncd.server.storage.audio import AudioDir, AudioUpload, StoredAudio

__all__ = ["AudioDir", "AudioUpload", "Storage", "StorageError", "StoredAudio", "utc_now"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS server_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- AUTOINCREMENT: a sequence number is never reused, so a cursor (the last seq a page showed)
-- stays valid however jobs are created and deleted.
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    user TEXT NOT NULL,
    local_id TEXT NOT NULL,
    text TEXT,
    metadata TEXT NOT NULL,
    status TEXT NOT NULL,
    audio_name TEXT,
    audio_filename TEXT,
    audio_size INTEGER,
    audio_sha256 TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (user, local_id)
);
CREATE INDEX IF NOT EXISTS jobs_user_seq ON jobs (user, seq);
CREATE TABLE IF NOT EXISTS collections (
    user TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
"""

_COLUMNS = (
    "seq, id, local_id, text, metadata, status, audio_filename, audio_size, audio_sha256, "
    "created_at, updated_at"
)

NEW_JOB_STATUS = "submitted"


class StorageError(Exception):
    """The database cannot be used by this release (e.g. it comes from a newer one)."""


def utc_now() -> str:
    """RFC 3339 UTC with milliseconds and a `Z`, as jobsyncd.model writes them."""
    moment = _dt.datetime.now(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def job_json(row: tuple[Any, ...]) -> str:
    """One job row as its API JSON text; metadata is stored as JSON text and spliced in as is."""
    _seq, job_id, local_id, text, metadata, status, a_file, a_size, a_sha, created, updated = row
    dumps = json.dumps
    if a_file is None:
        audio = "null"
    else:
        audio = f'{{"filename":{dumps(a_file)},"size":{a_size},"sha256":"{a_sha}"}}'
    return (
        f'{{"id":"{job_id}","local_id":"{local_id}","text":{dumps(text)},'
        f'"metadata":{metadata},"status":{dumps(status)},"audio":{audio},'
        f'"created_at":"{created}","updated_at":"{updated}"}}'
    )


class Storage:
    """Jobs of every user in one SQLite database; every method is safe to call from any thread."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = str(db_path)
        Path(self.db_path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._prepare()
        conn = self._conn()
        self._secret = bytes.fromhex(self._meta(conn, "cursor_secret"))
        self._epoch = self._meta(conn, "etag_epoch")

    # -- connections and schema -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE for writes).
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process; only a power loss may
        # lose the last transactions. No fsync per request.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _prepare(self) -> None:
        conn = self._conn()
        # Several processes (gunicorn workers) may start at once: create under a write lock.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.db_path}: database schema {version} is newer than this server "
                    f"understands ({SCHEMA_VERSION}); upgrade jobsyncd"
                )
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO server_meta VALUES ('cursor_secret', ?)",
                    (secrets.token_hex(32),),
                )
                conn.execute(
                    "INSERT OR IGNORE INTO server_meta VALUES ('etag_epoch', ?)",
                    (secrets.token_hex(4),),
                )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # Later releases migrate here: `if version == 1: ...; version = 2`.
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> str:
        return conn.execute("SELECT value FROM server_meta WHERE key = ?", (key,)).fetchone()[0]

    @staticmethod
    def _bump(conn: sqlite3.Connection, user: str) -> None:
        conn.execute(
            "INSERT INTO collections (user, version) VALUES (?, 1) "
            "ON CONFLICT (user) DO UPDATE SET version = version + 1",
            (user,),
        )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- ETags and cursors ------------------------------------------------------------------

    def _etag(self, conn: sqlite3.Connection, user: str) -> str:
        row = conn.execute("SELECT version FROM collections WHERE user = ?", (user,)).fetchone()
        return f'"{self._epoch}-{row[0] if row else 0}"'

    def etag(self, user: str) -> str:
        """The listing's ETag: changes whenever any job of `user` changes."""
        return self._etag(self._conn(), user)

    def _cursor_mac(self, user: str, seq: int) -> bytes:
        message = user.encode("utf-8", "surrogatepass") + b"\0" + seq.to_bytes(8, "big")
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:12]

    def make_cursor(self, user: str, seq: int) -> str:
        raw = seq.to_bytes(8, "big") + self._cursor_mac(user, seq)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def read_cursor(self, user: str, cursor: str) -> int | None:
        """The seq a cursor of this user stands for, or None for one this server did not issue."""
        if len(cursor) != 27 or not cursor.isascii():
            return None
        try:
            raw = base64.urlsafe_b64decode(cursor + "=")
        except ValueError:
            return None
        if len(raw) != 20 or base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != cursor:
            return None
        seq = int.from_bytes(raw[:8], "big")
        if not hmac.compare_digest(raw[8:], self._cursor_mac(user, seq)):
            return None
        return seq

    # -- jobs -------------------------------------------------------------------------------

    def list_page(self, user: str, after_seq: int, limit: int) -> tuple[str, list[str], int | None]:
        """(ETag, job JSON texts, last seq when more may follow) read in one snapshot."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            etag = self._etag(conn, user)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE user = ? AND seq > ? ORDER BY seq LIMIT ?",
                (user, after_seq, limit + 1),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        more = len(rows) > limit
        if more:
            del rows[limit:]
        return etag, [job_json(row) for row in rows], (rows[-1][0] if more else None)

    def get_job(self, user: str, job_id: str) -> str | None:
        row = (
            self._conn()
            .execute(f"SELECT {_COLUMNS} FROM jobs WHERE user = ? AND id = ?", (user, job_id))
            .fetchone()
        )
        return None if row is None else job_json(row)

    def exists(self, user: str, job_id: str) -> bool:
        row = (
            self._conn()
            .execute("SELECT 1 FROM jobs WHERE user = ? AND id = ?", (user, job_id))
            .fetchone()
        )
        return row is not None

    def create_job(
        self,
        user: str,
        local_id: str,
        text: str | None,
        metadata: dict[str, Any],
        audio: StoredAudio | None,
    ) -> tuple[str, bool]:
        """(job JSON, created). A local_id the user already has gives the existing job, unchanged;
        the UNIQUE (user, local_id) constraint makes that hold for concurrent repeats too."""
        conn = self._conn()
        now = utc_now()
        a = audio or StoredAudio(None, None, None, None)  # type: ignore[arg-type]
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                "INSERT INTO jobs (id, user, local_id, text, metadata, status, audio_name, "
                "audio_filename, audio_size, audio_sha256, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (user, local_id) DO NOTHING",
                (
                    str(uuid.uuid4()),
                    user,
                    local_id,
                    text,
                    json.dumps(metadata, separators=(",", ":")),
                    NEW_JOB_STATUS,
                    a.name,
                    a.filename,
                    a.size,
                    a.sha256,
                    now,
                    now,
                ),
            )
            created = cur.rowcount == 1
            if created:
                self._bump(conn, user)
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE user = ? AND local_id = ?", (user, local_id)
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return job_json(row), created

    def update_job(
        self, user: str, job_id: str, changes: dict[str, Any], audio: StoredAudio | None
    ) -> tuple[str | None, str | None]:
        """(job JSON or None when unknown, the replaced audio file's name to remove)."""
        sets: list[str] = []
        params: list[Any] = []
        if "text" in changes:
            sets.append("text = ?")
            params.append(changes["text"])
        if "metadata" in changes:
            sets.append("metadata = ?")
            params.append(json.dumps(changes["metadata"], separators=(",", ":")))
        if "status" in changes:
            sets.append("status = ?")
            params.append(changes["status"])
        if audio is not None:
            sets.append("audio_name = ?, audio_filename = ?, audio_size = ?, audio_sha256 = ?")
            params.extend((audio.name, audio.filename, audio.size, audio.sha256))
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = conn.execute(
                "SELECT audio_name FROM jobs WHERE user = ? AND id = ?", (user, job_id)
            ).fetchone()
            if old is None:
                conn.execute("COMMIT")
                return None, None
            if sets:
                sets.append("updated_at = ?")
                params.append(utc_now())
                conn.execute(
                    f"UPDATE jobs SET {', '.join(sets)} WHERE user = ? AND id = ?",
                    (*params, user, job_id),
                )
                self._bump(conn, user)
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE user = ? AND id = ?", (user, job_id)
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        replaced = old[0] if audio is not None else None
        return job_json(row), replaced

    def delete_job(self, user: str, job_id: str) -> tuple[bool, str | None]:
        """(deleted, the job's audio file name to remove)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT audio_name FROM jobs WHERE user = ? AND id = ?", (user, job_id)
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM jobs WHERE user = ? AND id = ?", (user, job_id))
                self._bump(conn, user)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return row is not None, (row[0] if row else None)
