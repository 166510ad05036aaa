"""The reference server's storage: jobs and their change log in SQLite (the default) or
PostgreSQL, audio files in a directory. base.py holds the contract both engines share.
"""

from __future__ import annotations

from jobsyncd.server.storage.audio import AudioDir, AudioUpload, StoredAudio
from jobsyncd.server.storage.base import (
    NEW_JOB_STATUS,
    ChangesPage,
    CheckpointDiverged,
    CheckpointExpired,
    SQLStorage,
    StorageBusy,
    StorageError,
    utc_now,
)
from jobsyncd.server.storage.postgres import PostgresStorage, is_postgres_url
from jobsyncd.server.storage.sqlite import SCHEMA_VERSION, SQLiteStorage

# `Storage(path)` opens an SQLite database, as before the engines were split.
Storage = SQLiteStorage

__all__ = [
    "NEW_JOB_STATUS",
    "SCHEMA_VERSION",
    "AudioDir",
    "AudioUpload",
    "ChangesPage",
    "CheckpointDiverged",
    "CheckpointExpired",
    "PostgresStorage",
    "SQLStorage",
    "SQLiteStorage",
    "Storage",
    "StorageBusy",
    "StorageError",
    "StoredAudio",
    "open_storage",
    "utc_now",
]


def open_storage(db: str) -> SQLStorage:
    """PostgreSQL for a `postgresql://` (or `postgres://`) URL, else an SQLite file."""
    if is_postgres_url(db):
        return PostgresStorage(db)
    return SQLiteStorage(db)
