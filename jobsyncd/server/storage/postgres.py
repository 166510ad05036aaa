"""The PostgreSQL engine: `--db postgresql://...`, through psycopg 3 and a psycopg_pool pool
(the `postgres` extra; imported here only, so the server runs without it on SQLite).

Writes run at READ COMMITTED: the first statement of each (`_bump`) upserts the user's row in
`collections`, whose row lock serialises that user's writers until commit, which keeps the change
counter in commit order across every worker process. Reads of the change feed run in a
REPEATABLE READ READ ONLY transaction (one snapshot). Every write also queues
`pg_notify('jobsyncd_changes', user)`, delivered at commit; one LISTEN connection per process
wakes that process's long-polls. Texts are stored as their JSON encoding, because PostgreSQL's
text type cannot hold a NUL character and a job's text may.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from jobsyncd.server.storage.base import (
    BATCH_UPDATE_SET,
    COLUMNS,
    SQLStorage,
    StorageBusy,
    StorageError,
    iter_statements,
    secrets_hex,
)

if TYPE_CHECKING:  # the postgres extra: imported at run time by this engine only, when used
    from psycopg import Connection, Cursor
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool

    from jobsyncd.server.storage.base import Tx

SCHEMA_VERSION = 1
CHANNEL = "jobsyncd_changes"
POOL_MAX = 10  # connections per worker process; long-polls hold none while they wait
POOL_TIMEOUT = 10.0
EXTRA_HINT = "PostgreSQL needs the driver: pip install 'jobsyncd[postgres]'"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS server_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    "user" TEXT NOT NULL,
    local_id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    status TEXT NOT NULL,
    audio_name TEXT,
    audio_filename TEXT,
    audio_size BIGINT,
    audio_sha256 TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    change_seq BIGINT NOT NULL,
    UNIQUE ("user", local_id)
);
CREATE INDEX IF NOT EXISTS jobs_user_seq ON jobs ("user", seq);
CREATE INDEX IF NOT EXISTS jobs_user_change ON jobs ("user", change_seq);
CREATE TABLE IF NOT EXISTS collections (
    "user" TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    purged_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tombstones (
    id TEXT PRIMARY KEY,
    "user" TEXT NOT NULL,
    local_id TEXT NOT NULL,
    change_seq BIGINT NOT NULL,
    deleted_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS tombstones_user_change ON tombstones ("user", change_seq);
CREATE INDEX IF NOT EXISTS tombstones_deleted_at ON tombstones (deleted_at)
"""

# Any constant: the advisory lock that lets only one worker create the schema at a time.
_SCHEMA_LOCK = 0x6A6F6273


def is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for the log."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


class _Tx:
    def __init__(self, conn: Connection[TupleRow]) -> None:
        self.conn = conn
        self.aborted = False

    def execute(
        self, sql: str, params: tuple[Any, ...] | list[Any] = (), binary: bool = False
    ) -> Cursor[TupleRow]:
        # binary: rows in PostgreSQL's binary format (a %b placeholder sends a parameter so:
        # an array then needs no quoting and escaping of every element in Python)
        return self.conn.execute(sql.replace("?", "%s"), params, binary=binary)

    def abort(self) -> None:
        self.aborted = True


class PostgresStorage(SQLStorage):
    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg  # noqa: F401 - the postgres extra; only this engine needs it
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise StorageError(EXTRA_HINT) from None
        self.url = url
        self.db_path = url
        self.description = redact(url)
        self._pool_lock = threading.Lock()
        self._pool_obj: ConnectionPool[Connection[TupleRow]] | None = None
        self._pid = os.getpid()
        self._listener: threading.Thread | None = None
        self._prepare()
        self._load_meta()

    # -- connections ------------------------------------------------------------------------

    def _pool(self) -> ConnectionPool[Connection[TupleRow]]:
        with self._pool_lock:
            if self._pool_obj is None or os.getpid() != self._pid:
                from psycopg_pool import ConnectionPool

                # After a fork (gunicorn --preload) the parent's connections are not ours.
                self._pid = os.getpid()
                self._listener = None
                self._pool_obj = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=POOL_MAX,
                    kwargs={"autocommit": True},
                    timeout=POOL_TIMEOUT,
                    name="jobsyncd",
                    open=True,
                )
            return self._pool_obj

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[_Tx]:
        import psycopg
        import psycopg_pool

        try:
            with self._pool().connection() as conn:
                conn.execute(begin)
                tx = _Tx(conn)
                try:
                    yield tx
                except BaseException:
                    if not conn.closed:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("ROLLBACK" if tx.aborted else "COMMIT")
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
            raise StorageBusy(f"the database is unavailable: {e}") from None

    def _read(self) -> AbstractContextManager[_Tx]:
        return self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _write(self, user: str | None = None) -> AbstractContextManager[_Tx]:
        return self._transaction("BEGIN")

    def _bump(self, tx: Tx, user: str) -> int:
        version = super()._bump(tx, user)
        tx.execute("SELECT pg_notify(?, ?)", (CHANNEL, user))  # sent at commit, not before
        return version

    def _jobs_by_local_id(self, tx: Tx, user: str, local_ids: list[str]) -> list[Any]:
        # One array parameter: the same statement for any count (prepared once per
        # connection), and no 500 placeholders to parse.
        assert isinstance(tx, _Tx)
        return tx.execute(
            f'SELECT {COLUMNS} FROM jobs WHERE "user" = %s AND local_id = ANY(%b)',
            (user, local_ids),
            binary=True,
        ).fetchall()

    def _insert_jobs(
        self, tx: Tx, user: str, now: str, rows: list[tuple[Any, ...]]
    ) -> set[str]:
        # One row of arrays, unnested by the server: the statement does not grow with the
        # batch, and psycopg sends nine parameters rather than 4,500.
        assert isinstance(tx, _Tx)
        columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)]
        inserted = tx.execute(
            'INSERT INTO jobs (id, "user", local_id, text, metadata, status, created_at, '
            "updated_at, change_seq) "
            "SELECT i, %s, l, t, m, s, %s, %s, c "
            "FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bigint[]) "
            "AS r(i, l, t, m, s, c) "
            'ON CONFLICT ("user", local_id) DO NOTHING RETURNING local_id',
            (user, now, now, *columns),
            binary=True,
        ).fetchall()
        return set(columns[1]) - {r[0] for r in inserted}

    def _audio_by_id(self, tx: Tx, user: str, job_ids: list[str]) -> list[Any]:
        assert isinstance(tx, _Tx)
        return tx.execute(
            'SELECT id, audio_name FROM jobs WHERE "user" = %s AND id = ANY(%b)',
            (user, job_ids),
            binary=True,
        ).fetchall()

    def _jobs_by_id(self, tx: Tx, user: str, job_ids: list[str]) -> list[Any]:
        assert isinstance(tx, _Tx)
        return tx.execute(
            f'SELECT {COLUMNS} FROM jobs WHERE "user" = %s AND id = ANY(%b)',
            (user, job_ids),
            binary=True,
        ).fetchall()

    def _update_jobs(
        self, tx: Tx, user: str, now: str, rows: list[tuple[Any, ...]]
    ) -> list[Any]:
        assert isinstance(tx, _Tx)
        columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)]
        return tx.execute(
            BATCH_UPDATE_SET.replace("?", "%s")
            + "FROM unnest(%b::text[], %b::bool[], %b::text[], %b::bool[], %b::text[], "
            "%b::bool[], %b::text[], %b::bool[], %b::bigint[]) "
            "AS v(vid, ht, vt, hm, vm, hs, vs, ha, vseq) "
            f'WHERE jobs."user" = %s AND jobs.id = v.vid RETURNING {COLUMNS}',
            (now, *columns, user),
            binary=True,
        ).fetchall()

    def _delete_jobs(self, tx: Tx, user: str, job_ids: list[str]) -> list[Any]:
        assert isinstance(tx, _Tx)
        return tx.execute(
            'DELETE FROM jobs WHERE "user" = %s AND id = ANY(%b) '
            "RETURNING id, audio_name, local_id",
            (user, job_ids),
            binary=True,
        ).fetchall()

    def _insert_tombstones(self, tx: Tx, user: str, rows: list[tuple[Any, ...]]) -> None:
        assert isinstance(tx, _Tx)
        ids, local_ids, seqs, times = ([list(c) for c in zip(*rows, strict=True)])
        tx.execute(
            'INSERT INTO tombstones (id, "user", local_id, change_seq, deleted_at) '
            "SELECT i, %s, l, c, d FROM unnest(%b::text[], %b::text[], %b::bigint[], "
            "%b::float8[]) AS r(i, l, c, d)",
            (user, ids, local_ids, seqs, times),
            binary=True,
        )

    def _text_in(self, value: str | None) -> Any:
        return json.dumps(value, ensure_ascii=False)

    def _text_json(self, stored: Any) -> str:
        return str(stored)

    def close(self) -> None:
        with self._pool_lock:
            if self._pool_obj is not None:
                self._pool_obj.close()
                self._pool_obj = None

    # -- schema -----------------------------------------------------------------------------

    def _prepare(self) -> None:
        import psycopg

        try:
            with (
                psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn,
                conn.transaction(),
            ):
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS server_meta "
                    "(key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                )
                row = conn.execute(
                    "SELECT value FROM server_meta WHERE key = 'schema_version'"
                ).fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise StorageError(
                        f"{self.description}: database schema {version} is newer than this "
                        f"server understands ({SCHEMA_VERSION}); upgrade jobsyncd"
                    )
                if version == 0:
                    for statement in iter_statements(_SCHEMA):
                        conn.execute(statement)
                    for key, value in (
                        ("cursor_secret", secrets_hex(32)),
                        ("etag_epoch", secrets_hex(4)),
                        ("history_id", secrets_hex(16)),
                        ("schema_version", str(SCHEMA_VERSION)),
                    ):
                        conn.execute(
                            "INSERT INTO server_meta VALUES (%s, %s) ON CONFLICT DO NOTHING",
                            (key, value),
                        )
                # Later releases migrate here: `if version == 1: ...`.
        except psycopg.Error as e:
            raise StorageError(f"{self.description}: {e}".strip()) from None

    # -- long-polls across processes --------------------------------------------------------

    def _listen(self) -> None:
        self._pool()  # notices a fork
        with self._watch_lock:
            if self._listener is None or not self._listener.is_alive():
                self._listener = threading.Thread(
                    target=self._listen_forever, name="jobsyncd-pg-listen", daemon=True
                )
                self._listener.start()

    def _listen_forever(self) -> None:
        import psycopg

        while True:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.waiters.wake_all()  # whatever committed before LISTEN: they re-read
                    # Blocks until a notification or a broken connection (then: reconnect).
                    for note in conn.notifies():
                        self.waiters.wake(note.payload)
            except psycopg.Error:
                self.waiters.wake_all()
                time.sleep(1.0)
