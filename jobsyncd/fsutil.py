"""File-system helpers of the data dir: no-follow opens, fsync of directories, whole writes,
atomic replacement of small files, the data dir's creation and checks, and the flock lock.

Every file jobsyncd writes goes through these: never through a symlink, 0600 in a 0700 dir,
crash-safe (a reader sees the old content or the new). No job, store or HTTP knowledge here.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time

from .errors import ConfigError, JobsyncdError, SymlinkRefused, TryLater

LOCK_TIMEOUT_SECONDS = 30.0

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open that refuses symlinks (and anything but a regular file) with a clear error."""
    try:
        fd = os.open(path, flags | _O_NOFOLLOW | O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SymlinkRefused(path) from None
        if exc.errno == errno.EISDIR:
            raise JobsyncdError(f"{path} is a directory, not a file jobsyncd can use") from None
        raise JobsyncdError(f"cannot open {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise JobsyncdError(f"{path} is not a regular file; refusing to use it")
    return fd


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, blob: bytes) -> None:
    view = memoryview(blob)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_file_atomically(
    data_dir: str, name: str, content: bytes | list[bytes], durable: bool = False
) -> None:
    """Write `name` in the data dir whole (temporary file + rename), never through a symlink;
    `content` may come in parts (written one after the other, never joined).

    Raises JobsyncdError naming the file; no temporary file is left behind.
    """
    import secrets  # costs start-up time: only the commands that write a state file need it

    path = os.path.join(data_dir, name)
    if os.path.islink(path):
        raise SymlinkRefused(path)
    tmp = os.path.join(data_dir, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            for part in content if isinstance(content, list) else [content]:
                write_all(fd, part)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(data_dir)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise JobsyncdError(f"cannot write {path}: {exc.strerror}") from None


def prepare_data_dir(path: str) -> str:
    """Create the data dir 0700 (umask 077), refuse one owned by someone else, tighten its mode."""
    os.umask(0o077)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise JobsyncdError(f"cannot create the data dir {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise JobsyncdError(f"the data dir {path} is not a directory")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise JobsyncdError(
            f"the data dir {path} belongs to another user (uid {st.st_uid}); refusing to use it"
        )
    if st.st_mode & 0o077:
        strangers = _not_ours(path)
        if strangers:
            # Never change the mode of a directory that is not jobsyncd's own (`--data-dir /`
            # or `~` would lock others out of it): refuse, naming what is in it.
            raise ConfigError(
                f"the data dir {path} is open to other users and holds files that are not "
                f"jobsyncd's ({', '.join(strangers[:3])}); use a directory of its own"
            )
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            if exc.errno != errno.EROFS:  # a read-only mount: reading it is still fine
                raise JobsyncdError(
                    f"cannot make the data dir {path} private: {exc.strerror}"
                ) from None
    # A data dir that cannot be written still serves reads (list, show, status); a write
    # fails then with one line naming the file.
    return path


_OWN_SUFFIXES = (".lock", ".json", ".tmp", ".sock", ".pid")


def _not_ours(path: str) -> list[str]:
    """Entries of `path` that jobsyncd does not make (empty when it holds only ours)."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    return [
        n
        for n in names
        if n != "audio" and not n.startswith("jobs.jsonl") and not n.endswith(_OWN_SUFFIXES)
    ]


class FileLock:
    """An exclusive flock on a lock file, re-entrant within one process object, thread-safe.

    The store's, the sync pass's and the daemon's lock. fcntl directly rather than the `filelock`
    package, whose import costs ~20-38 ms, as much as all of `jobsyncd create` may take.
    """

    def __init__(
        self, path: str, timeout: float = LOCK_TIMEOUT_SECONDS, what: str = "the store"
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.what = what
        self._fd: int | None = None
        self._depth = 0
        self._mutex = threading.RLock()

    def acquire(self) -> None:
        self._mutex.acquire()
        if self._depth:
            self._depth += 1
            return
        try:
            fd = self._open()
            if fd is None:  # a read-only file system: nobody can be writing, no lock needed
                self._depth = 1
                return
            deadline = time.monotonic() + self.timeout
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        raise JobsyncdError(f"cannot lock {self.path}: {exc.strerror}") from None
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise TryLater(
                        f"{self.what} is locked by another process ({self.path}); try again"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        except BaseException:
            self._mutex.release()
            raise
        self._fd = fd
        self._depth = 1

    def _open(self) -> int | None:
        try:
            return open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        except JobsyncdError:
            try:
                read_only = os.statvfs(os.path.dirname(self.path)).f_flag & os.ST_RDONLY
            except OSError:
                read_only = False
            if not read_only:
                raise
            if os.path.lexists(self.path):
                return open_nofollow(self.path, os.O_RDONLY)  # flock works on a read-only fd
            return None

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        self._mutex.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
