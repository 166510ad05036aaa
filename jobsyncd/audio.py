"""Managed audio copies in the data dir's `audio/` folder; the only code that deletes files.

The user's file is copied (never moved or touched); a copy is written under a temporary name,
fsynced and renamed. Removal is refused for anything that is not a plain file directly inside
our own `audio/` folder, whatever path a record or a server names.
"""

from __future__ import annotations

import os
import re
import stat

from .errors import JobsyncdError, SymlinkRefused, UsageProblem
from .fsutil import O_CLOEXEC, fsync_dir, open_nofollow

AUDIO_DIR = "audio"


def audio_dir(data_dir: str, create: bool = True) -> str:
    path = os.path.join(data_dir, AUDIO_DIR)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return path
        os.mkdir(path, 0o700)
        return path
    if stat.S_ISLNK(st.st_mode):
        raise SymlinkRefused(path)
    if not stat.S_ISDIR(st.st_mode):
        raise JobsyncdError(f"{path} is not a directory")
    return path


def _suffix(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return ext.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", ext) else ""


def open_user_audio(src: str) -> int:
    """Open the user's audio file for reading, or raise a usage error (exit 2)."""
    try:
        # O_NONBLOCK: a FIFO with no writer must not hang the command; cleared for reading.
        fd = os.open(src, os.O_RDONLY | O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageProblem(f"cannot read audio file {src}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageProblem(f"audio file {src} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def import_copy(data_dir: str, src_fd: int, src_name: str, local_id: str) -> str:
    """Copy the open user file into audio/ under a fresh name; returns the copy's absolute path."""
    folder = audio_dir(data_dir)
    final = os.path.join(folder, f"{local_id}-{os.urandom(4).hex()}{_suffix(src_name)}")
    tmp = os.path.join(folder, f".tmp-{os.urandom(8).hex()}")
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        while True:
            try:
                chunk = os.read(src_fd, 1 << 20)
            except OSError as exc:
                raise UsageProblem(f"cannot read audio file {src_name}: {exc.strerror}") from None
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(tmp)
        raise JobsyncdError(f"cannot copy the audio file into {folder}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    os.rename(tmp, final)
    fsync_dir(folder)
    return os.path.abspath(final)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


ORPHAN_GRACE_SECONDS = 3600.0


def sweep_orphans(
    data_dir: str, referenced: set[str], now: float, grace: float = ORPHAN_GRACE_SECONDS
) -> tuple[int, list[str]]:
    """Remove copies in audio/ that no job names and that are older than `grace` seconds (a
    crash between copying a file and saving its job leaves one). The grace keeps a `create`
    or `update` in progress safe. Returns (files removed, problems)."""
    folder = audio_dir(data_dir, create=False)
    removed, problems = 0, []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0, []
    keep = {os.path.realpath(p) for p in referenced}
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) or now - st.st_mtime < grace:
            continue
        if os.path.realpath(os.path.join(folder, entry.name)) in keep:
            continue
        problem = remove_managed(data_dir, os.path.join(folder, entry.name))
        if problem:
            problems.append(problem)
        else:
            removed += 1
    return removed, problems


def remove_managed(data_dir: str, path: str | None) -> str | None:
    """Delete a managed copy. Returns None when done (or nothing to do), else why it was not.

    Never raises: a copy that cannot be removed must not fail a job or a pass.
    """
    if not path:
        return None
    folder = os.path.realpath(os.path.join(data_dir, AUDIO_DIR))
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    name = os.path.basename(path)
    if parent != folder or not name or name in (".", ".."):
        return f"refusing to delete {path}: it is not inside {folder}"
    target = os.path.join(folder, name)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot remove {target}: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return f"refusing to delete {target}: it is a directory"
    try:
        os.unlink(target)  # unlinks a planted symlink itself, never what it points to
    except OSError as exc:
        return f"cannot remove {target}: {exc.strerror}"
    return None
