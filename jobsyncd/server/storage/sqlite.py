"""The SQLite engine (the default): one database file in WAL mode, one connection per thread.

Writes run in `BEGIN IMMEDIATE` transactions, which take the database's single write lock at
once: that serialises every writer of every process, so the change counter is in commit order
whatever the number of workers. A writer waits up to BUSY_TIMEOUT_MS for the lock; past that the
request answers 503 with Retry-After, never "database is locked". Other processes' commits reach
this process's long-polls through a watcher thread that reads `PRAGMA data_version` (a counter
SQLite bumps when another connection commits) every WATCH_INTERVAL seconds while anyone waits.

Checkpoints (copying the WAL's pages back into the database) run in a thread of their own once
writes pause (CHECKPOINT_QUIET), not in the request whose commit happens to cross SQLite's
threshold: at 100,000 jobs a checkpoint after a batch of 500 updates took 25-35 ms of that
batch's answer. A request checkpoints only if the WAL outgrows WAL_BACKSTOP_PAGES (the thread
unable to keep up, or gone).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from jobsyncd.server.storage.base import (
    SQLStorage,
    StorageBusy,
    StorageError,
    iter_statements,
    secrets_hex,
)

_json_string = json.encoder.encode_basestring_ascii

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000
WATCH_INTERVAL = 0.05
WAL_BACKSTOP_PAGES = 10_000  # 40 MiB of 4 KiB pages; SQLite's own default is 1,000
CHECKPOINT_QUIET = 0.2  # seconds without a write before the thread checkpoints
CHECKPOINT_MAX_DELAY = 2.0  # seconds after a write at most, however busy the writers
CHECKPOINT_RETIRE = 60.0  # seconds without a write before the thread ends (a write restarts it)

_SCHEMA_V1 = """
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

# Version 2: the change log. A job keeps the counter of its latest change (jobs from version 1
# get 0 and so appear to a reader from the beginning); deletions leave tombstones.
_MIGRATE_V2 = """
ALTER TABLE jobs ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_user_change ON jobs (user, change_seq);
ALTER TABLE collections ADD COLUMN purged_seq INTEGER NOT NULL DEFAULT 0;
CREATE TABLE tombstones (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    local_id TEXT NOT NULL,
    change_seq INTEGER NOT NULL,
    deleted_at REAL NOT NULL
);
CREATE INDEX tombstones_user_change ON tombstones (user, change_seq);
CREATE INDEX tombstones_deleted_at ON tombstones (deleted_at);
"""


class _Tx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.aborted = False

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def abort(self) -> None:
        self.aborted = True


def _locked(error: sqlite3.OperationalError) -> bool:
    return "locked" in str(error) or "busy" in str(error)


class SQLiteStorage(SQLStorage):
    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.db_path = str(db_path)
        self.description = self.db_path
        Path(self.db_path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._pid = os.getpid()
        self._watcher: threading.Thread | None = None
        self._wrote = threading.Event()  # set by each commit: the checkpointer's cue
        self._closing = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._checkpointer_pid = 0
        try:
            self._prepare()
            self._load_meta()
        except sqlite3.Error as e:
            raise StorageError(f"{self.db_path}: {e}") from None

    # -- connections ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE for writes).
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process; only a power loss may
        # lose the last transactions. No fsync per request.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES}")
        return conn

    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:  # forked (gunicorn --preload): a connection is not shared
            self._local = threading.local()
            self._pid = os.getpid()
            self._watcher = None
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[_Tx]:
        conn = self._conn()
        try:
            conn.execute(begin)
        except sqlite3.OperationalError as e:
            if _locked(e):
                raise StorageBusy("the database is busy; try again") from None
            raise
        tx = _Tx(conn)
        try:
            yield tx
        except sqlite3.OperationalError as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if _locked(e):  # a reader that met a checkpoint or recovery: rare, retry later
                raise StorageBusy("the database is busy; try again") from None
            raise
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("ROLLBACK" if tx.aborted else "COMMIT")
        except sqlite3.OperationalError as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if _locked(e):
                raise StorageBusy("the database is busy; try again") from None
            raise

    def _read(self) -> AbstractContextManager[_Tx]:
        # A deferred transaction: WAL gives it one snapshot from its first read, and it never
        # waits for writers.
        return self._transaction("BEGIN")

    @contextmanager
    def _write(self, user: str | None = None) -> Iterator[_Tx]:
        with self._transaction("BEGIN IMMEDIATE") as tx:
            yield tx
        if not tx.aborted:
            self._checkpoint_soon()
        if user is not None and not tx.aborted:
            self.waiters.wake(user)  # this process's long-polls; others see data_version move

    def _text_in(self, value: str | None) -> Any:
        return value

    def _text_json(self, stored: Any) -> str:
        # json.dumps of a str or None, without its dispatch (two per job of every answer)
        return "null" if stored is None else _json_string(stored)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._watch_lock:  # no thread starts after this (_checkpoint_soon)
            self._closing.set()
            checkpointer = self._checkpointer if self._checkpointing() else None
        if checkpointer is not None:
            self._wrote.set()  # wakes it: one last checkpoint, then it ends
            checkpointer.join(timeout=5)

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpoint_soon(self) -> None:
        """After a commit: the checkpointer thread copies the WAL back once writes pause.
        Under the lock the thread decides to end under: a cue given while it ends starts
        another (a lock taken once per commit, against a commit's milliseconds)."""
        with self._watch_lock:
            self._wrote.set()
            if self._checkpointing() or self._closing.is_set():
                return
            self._checkpointer_pid = os.getpid()  # forked: this process's own thread
            self._checkpointer = threading.Thread(
                target=self._checkpoints, name="jobsyncd-sqlite-checkpoint", daemon=True
            )
            self._checkpointer.start()

    def _checkpointing(self) -> bool:
        checkpointer = self._checkpointer
        if checkpointer is None or self._checkpointer_pid != os.getpid():
            return False
        return checkpointer.is_alive()

    def _checkpoints(self) -> None:
        """PASSIVE checkpoints (they wait for no reader or writer, and copy what they can),
        each once CHECKPOINT_QUIET has passed without a write, or CHECKPOINT_MAX_DELAY since
        the first write not copied yet; the thread ends after CHECKPOINT_RETIRE idle."""
        try:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return  # the next write starts another; the backstop bounds the WAL meanwhile
        wrote, closing = self._wrote, self._closing
        try:
            while not closing.is_set():
                if not wrote.wait(CHECKPOINT_RETIRE):
                    with self._watch_lock:  # a write between the wait and here restarts it
                        if not wrote.is_set():
                            self._checkpointer = None
                            return
                    continue
                first = time.monotonic()
                wrote.clear()
                while not closing.is_set() and time.monotonic() - first < CHECKPOINT_MAX_DELAY:
                    if not wrote.wait(CHECKPOINT_QUIET):
                        break
                    wrote.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # the next write asks again; the backstop bounds the WAL meanwhile
        finally:
            conn.close()

    # -- schema -----------------------------------------------------------------------------

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
                for statement in iter_statements(_SCHEMA_V1):
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO server_meta VALUES ('cursor_secret', ?)",
                    (secrets_hex(32),),
                )
                conn.execute(
                    "INSERT OR IGNORE INTO server_meta VALUES ('etag_epoch', ?)", (secrets_hex(4),)
                )
                version = 1
            if version == 1:
                for statement in iter_statements(_MIGRATE_V2):
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO server_meta VALUES ('history_id', ?)",
                    (secrets_hex(16),),
                )
                version = 2
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- long-polls across processes --------------------------------------------------------

    def _listen(self) -> None:
        with self._watch_lock:
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(
                    target=self._watch, name="jobsyncd-sqlite-watch", daemon=True
                )
                self._watcher.start()

    def _watch(self) -> None:
        """While anyone waits: when another connection has committed, wake the waiters whose
        user's counter moved. The connection is this thread's own and never writes."""
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        stop = threading.Event()
        seen = -1
        idle = 0
        try:
            while True:
                stop.wait(WATCH_INTERVAL)
                waited = self.waiters.users()
                if not waited:
                    idle += 1
                    if idle >= 200 and self._retire():
                        return  # 10 s without waiters; the next long-poll starts another
                    continue
                idle = 0
                try:
                    data_version = conn.execute("PRAGMA data_version").fetchone()[0]
                    if data_version == seen:
                        continue
                    seen = data_version
                    for user, version in waited.items():
                        row = conn.execute(
                            'SELECT version FROM collections WHERE "user" = ?', (user,)
                        ).fetchone()
                        current = row[0] if row else 0
                        if current != version:
                            self.waiters.wake(user, current)
                except sqlite3.Error:
                    self.waiters.wake_all()  # they read for themselves
        finally:
            conn.close()

    def _retire(self) -> bool:
        """Stop watching unless a waiter arrived: decided under the lock _listen takes."""
        with self._watch_lock:
            if self.waiters:
                return False
            self._watcher = None
            return True
