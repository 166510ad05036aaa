"""Audio files of the reference server: stored under names the server chooses; an upload goes to a
temp file in `.tmp/`, is made durable, then renamed into place."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import uuid
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class StoredAudio:
    """An audio file already renamed into the audio dir, ready to be recorded on a job."""

    name: str  # the server's file name inside the audio dir
    filename: str  # the client's file name, sanitised, kept as metadata only
    size: int
    sha256: str


class AudioDir:
    """Audio files under names the server chooses; uploads go to a temp file, then are renamed."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._sweep_temp_files()

    def _sweep_temp_files(self) -> None:
        # Left by a server killed mid-upload. Only old ones: another worker may be uploading now.
        horizon = time.time() - 3600
        for path in self.tmp.iterdir():
            try:
                if path.stat().st_mtime < horizon:
                    path.unlink()
            except OSError:
                pass

    def new_upload(self) -> AudioUpload:
        return AudioUpload(self)

    def path(self, name: str) -> Path:
        return self.root / name

    def remove(self, name: str | None) -> None:
        if name:
            try:
                (self.root / name).unlink()
            except FileNotFoundError:
                pass


class AudioUpload:
    """One audio part being received: written to a temp file while its size and sha256 grow."""

    def __init__(self, audio_dir: AudioDir) -> None:
        self._dir = audio_dir
        self.name = uuid.uuid4().hex
        self._tmp_path = audio_dir.tmp / self.name
        self._file = open(self._tmp_path, "xb")  # noqa: SIM115 - closed in commit/discard
        self._hash = hashlib.sha256()
        self.size = 0
        self.filename = "audio"

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)
        self.size += len(data)

    def commit(self) -> StoredAudio:
        """Make the file durable and move it under its final name (atomic on one filesystem)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path, self._dir.path(self.name))
        return StoredAudio(self.name, self.filename, self.size, self._hash.hexdigest())

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            self._tmp_path.unlink()
        except FileNotFoundError:
            pass
