"""The JSON-lines job store (`jobs.jsonl`): append, fold, find, compact, lock, repair.

Each line is a whole job record (or a `purged` tombstone); later lines supersede earlier ones.
Writers serialise on `jobs.lock` (flock); every append is one write of whole lines, fsynced;
compaction writes a temporary file, fsyncs it and renames it over the store (then fsyncs the
directory), so a crash at any instant leaves the old store or the new one, never a mix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

from .errors import ConfigError, JobsyncdError, NoSuchJob, SymlinkRefused, TryLater
from .model import STATUSES, Job, compact_json

STORE_NAME = "jobs.jsonl"
LOCK_NAME = "jobs.lock"
TMP_NAME = "jobs.jsonl.tmp"
# Left by a reader that found unreadable lines, so that the next write of any process (even a
# CLI command that never folds the store) rewrites the store without them.
REPAIR_NAME = "jobs.jsonl.repair"
MIN_PREFIX = 6
LOCK_TIMEOUT_SECONDS = 30.0
# Compact automatically when dead records outweigh live ones, once the file has this many lines.
AUTO_COMPACT_MIN_LINES = 200

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _default_warn(message: str) -> None:
    print(f"jobsyncd: warning: {message}", file=sys.stderr)


def encode_record(record: dict[str, Any]) -> bytes:
    # Compact separators and local_id first: `find` relies on each line starting with
    # {"local_id":"<id>" so it can locate a job's lines without parsing the whole store.
    return compact_json(record).encode() + b"\n"


def tombstone(local_id: str) -> dict[str, Any]:
    return {"local_id": local_id, "purged": True}


def _valid_record(rec: Any) -> bool:
    if not isinstance(rec, dict) or not isinstance(rec.get("local_id"), str):
        return False
    if rec.get("purged") is True:
        return True
    return (
        rec.get("sync_status") in STATUSES
        and isinstance(rec.get("metadata", {}), dict)
        and isinstance(rec.get("text", ""), str)
    )


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open that refuses symlinks (and anything but a regular file) with a clear error."""
    try:
        fd = os.open(path, flags | _O_NOFOLLOW | _O_CLOEXEC, mode)
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
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    The `filelock` package does the same for the daemon lock; here the store uses fcntl directly
    because importing filelock costs ~38 ms, as much as all of `jobsyncd create` may take.
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


class Store:
    """The store of one data dir. `load()` folds it; `refresh()` reads only what was appended."""

    def __init__(self, data_dir: str, warn: Callable[[str], None] = _default_warn) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, STORE_NAME)
        self.tmp_path = os.path.join(data_dir, TMP_NAME)
        self.repair_marker = os.path.join(data_dir, REPAIR_NAME)
        self.warn = warn
        self.lock = FileLock(os.path.join(data_dir, LOCK_NAME))
        self.jobs: dict[str, Job] = {}
        self._loaded = False
        # The file as last read, held open: while we hold it its inode cannot be reused, so a
        # compaction by another process (a new inode at the path) is always noticed.
        self._held_fd: int | None = None
        self._offset = 0  # end of the last complete line folded
        self._lines = 0  # records in the file (live and dead)
        self._needs_repair = False  # torn tail or corrupt lines: the next write compacts
        self._warned: set[str] = set()

    @contextmanager
    def locked(self) -> Iterator[Store]:
        with self.lock:
            yield self

    # ---- reading -------------------------------------------------------------------------
    def _read_and_parse(self, fd: int, start: int) -> tuple[int, int, bool]:
        """Fold the file from `start` on, read in blocks so that a large store is never held in
        memory whole; returns (records folded, length of the complete lines, any line bad)."""
        block_size = 4 << 20
        total, bad, pending = 0, False, b""
        offset = start
        current = os.pread(fd, block_size, offset)
        while current:
            offset += len(current)
            following = os.pread(fd, block_size, offset)
            data = pending + current if pending else current
            base = offset - len(data)
            if following:
                cut = data.rfind(b"\n") + 1
                count, _, was_bad = self._parse(data[:cut], base, final=False)
                pending = data[cut:]
            else:
                count, end, was_bad = self._parse(data, base, final=True)
                pending = data[end:]
            total += count
            bad = bad or was_bad
            current = following
        return total, offset - len(pending) - start, bad

    def _parse(self, data: bytes, base_offset: int, final: bool = True) -> tuple[int, int, bool]:
        """Fold the records in `data`; returns (records folded, length of its complete lines,
        whether any line was bad). `final`: `data` runs to the end of the file."""
        end = data.rfind(b"\n") + 1
        bad = False
        if data[end:].strip():
            self._warn_once(
                f"torn:{base_offset + end}",
                f"{self.path}: the last line is incomplete (a write was interrupted); it is skipped "
                "and will be repaired on the next write",
            )
            bad = True
        count = 0
        pos = 0
        # Parse ~1 MiB of whole lines at a time with one json.loads: several times faster than a
        # call per line, and folded at once so that a large store is never held twice in memory.
        while pos < end:
            cut = data.rfind(b"\n", pos, min(pos + (1 << 20), end) - 1) + 1
            if cut <= pos:
                cut = data.find(b"\n", pos, end) + 1
            piece = data[pos:cut]
            is_last = final and cut >= end
            pos = cut
            try:
                # The lines as one array without splitting them (a blank line breaks it: then
                # the lines that are not blank are joined, and failing that parsed one by one).
                parsed = json.loads(b"[" + piece[:-1].replace(b"\n", b",") + b"]")
                if all(_valid_record(r) for r in parsed):
                    self._fold(parsed)
                    count += len(parsed)
                    continue
            except ValueError:
                pass
            chunk = [ln for ln in piece.split(b"\n") if ln.strip()]
            if not chunk:
                continue
            try:
                parsed = json.loads(b"[" + b",".join(chunk) + b"]")
                if all(_valid_record(r) for r in parsed):
                    self._fold(parsed)
                    count += len(parsed)
                    continue
            except ValueError:
                pass
            for number, line in enumerate(chunk):
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if _valid_record(rec):
                    self._fold([rec])
                    count += 1
                    continue
                bad = True
                self._mark_for_repair()
                if is_last and number == len(chunk) - 1:
                    self._warn_once(
                        f"lastbad:{line[:64]!r}",
                        f"{self.path}: the last line cannot be read; it is skipped and will be "
                        "repaired on the next write",
                    )
                else:
                    self._set_aside(line)
        return count, end, bad

    def _mark_for_repair(self) -> None:
        if os.path.lexists(self.repair_marker):
            return
        try:
            os.close(open_nofollow(self.repair_marker, os.O_WRONLY | os.O_CREAT))
        except (OSError, JobsyncdError):
            pass  # best effort: a loaded store repairs at its next write anyway

    def _set_aside(self, line: bytes) -> None:
        import hashlib

        digest = hashlib.sha256(line).hexdigest()[:16]
        aside = f"{self.path}.corrupt-{digest}"
        if not os.path.lexists(aside):
            try:
                fd = open_nofollow(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                try:
                    os.write(fd, line + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except (OSError, JobsyncdError) as exc:
                self.warn(f"cannot copy an unreadable line of {self.path} aside: {exc}")
                return
        self._warn_once(
            "aside:" + digest,
            f"{self.path} holds an unreadable line; copied to {aside}; it is dropped from the "
            "store at the next write and every other job loads",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    def _fold(self, records: list[dict[str, Any]]) -> None:
        jobs = self.jobs
        for rec in records:
            local_id = rec["local_id"]
            if rec.get("purged"):
                jobs.pop(local_id, None)
            else:
                try:
                    jobs[local_id] = Job.from_record(rec)
                except TypeError:
                    self._needs_repair = True

    def load(self) -> dict[str, Job]:
        """Fold the whole store into `self.jobs` (under the lock)."""
        with self.lock:
            self._release_held()
            try:
                fd = open_nofollow(self.path, os.O_RDONLY)
            except JobsyncdError:
                if os.path.lexists(self.path):
                    raise
                fd = None
            self.jobs = {}
            count, end, bad = self._read_and_parse(fd, 0) if fd is not None else (0, 0, False)
            self._held_fd, self._offset, self._lines = fd, end, count
            self._needs_repair = bad or self._enforce_one_binding()
            self._loaded = True
            if not bad and os.path.lexists(self.repair_marker):
                _unlink_quietly(self.repair_marker)
        return self.jobs

    def _enforce_one_binding(self) -> bool:
        """The store's invariant (contract 6.3/6.4): one server_id never belongs to two local
        jobs. A store that breaks it (written by jobsyncd before 0.2, which could pull a job
        re-created on the server as a second local job) is repaired in memory, with a warning,
        and rewritten by the next write: the binding stays with the job holding a local change
        other than a deletion (else the oldest; a deletion of a duplicate must never delete the
        other's server copy); a `synced` duplicate is a mere copy of the server job and goes; any
        other loses its server_id (a pending one is then created anew, a deletion just drops).
        Returns whether anything was repaired."""
        first: dict[str, Job] = {}
        groups: dict[str, list[Job]] = {}
        for job in self.jobs.values():
            sid = job.server_id
            if sid is None:
                continue
            held = first.setdefault(sid, job)
            if held is not job:
                groups.setdefault(sid, [held]).append(job)
        for sid, group in groups.items():
            group.sort(key=_keeper_order)
            keeper, others = group[0], group[1:]
            for job in others:
                if job.sync_status == "synced":
                    del self.jobs[job.local_id]
                else:
                    job.server_id, job.base, job.create_sent, job.audio_sent = None, None, False, None
            self.warn(
                f"{self.path}: server id {sid[:64]!r} was bound to {len(group)} local jobs; it "
                f"stays with {keeper.local_id}, and "
                + ", ".join(j.local_id for j in others)
                + " no longer hold it (a synced copy is dropped)"
            )
        return bool(groups)

    @property
    def loaded(self) -> bool:
        return self._loaded

    def may_hold_due_jobs(self) -> bool:
        """False only when no job's latest line names a status that needs a push (pending,
        pending_deletion, error), found by byte search without folding the store. Lines of jobs
        synced since are checked against the job's last line, up to a few dozen; beyond that,
        or when a status is named inside metadata, it answers True (fold and see)."""
        with self.mapped() as data:
            return data is not None and _may_hold_due_jobs(data)

    def bound_once(self, server_id: str) -> bool:
        """Whether at most one job holds `server_id` (the invariant a load repairs)."""
        if self._loaded:
            return sum(1 for j in self.refresh().values() if j.server_id == server_id) <= 1
        with self.mapped() as data:
            if data is None:
                return True
            return len({j.local_id for j in self._bound_to(data, server_id)}) <= 1

    def due_candidates(self, limit: int) -> list[str] | None:
        """The local_ids whose latest line names a status that needs a push, found by byte
        search without folding; None when there are more than `limit` (or the layout is not
        ours): then fold and see."""
        with self.mapped() as data:
            return [] if data is None else _due_candidates(data, limit)

    @contextmanager
    def mapped(self) -> Iterator[Any]:
        """The store file mapped read-only, under the lock (None when missing or empty).

        Searched in place, without a copy: bytes.find's fast search over the page cache finds a
        job's lines among 100,000 in a few milliseconds."""
        with self.lock:
            try:
                fd = open_nofollow(self.path, os.O_RDONLY)
            except JobsyncdError:
                if os.path.lexists(self.path):
                    raise
                yield None
                return
            try:
                size = os.fstat(fd).st_size
                if not size:
                    yield None
                    return
                with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
                    yield data
            finally:
                os.close(fd)

    def unload(self) -> None:
        """Forget the folded jobs (a long-lived process between passes)."""
        with self.lock:
            self._release_held()
            self.jobs = {}
            self._loaded = False

    def _release_held(self) -> None:
        if self._held_fd is not None:
            os.close(self._held_fd)
            self._held_fd = None

    def refresh(self) -> dict[str, Job]:
        """Bring `self.jobs` up to date with what other processes appended since the last look."""
        if not self._loaded:
            return self.load()
        with self.lock:
            try:
                st = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                return self.load()
            if self._held_fd is None:
                return self.load()
            held = os.fstat(self._held_fd)
            if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino) or st.st_size < self._offset:
                return self.load()  # compacted or replaced: read it whole
            if st.st_size == self._offset:
                return self.jobs
            count, end, bad = self._read_and_parse(self._held_fd, self._offset)
            self._offset += end
            self._lines += count
            self._needs_repair = self._needs_repair or bad
        return self.jobs

    # ---- finding one job without folding the whole store ---------------------------------
    def find(self, ref: str) -> Job:
        """Resolve JOB (section 2): exact local_id, exact server_id, unique local_id prefix >= 6."""
        ref_b = ref.encode()
        if b'"' in ref_b or b"\\" in ref_b or b"\n" in ref_b:
            raise NoSuchJob(f"no job matches {ref!r}")
        with self.mapped() as data:
            if data is None:
                raise NoSuchJob(f"no job matches {ref!r}")
            return self._find_in(data, ref)

    def _find_in(self, data: Any, ref: str) -> Job:
        job = self._fold_one(data, ref.lower())
        if job is not None:
            return job
        by_server_id = self._by_server_id(data, ref)
        if len(by_server_id) > 1:
            raise NoSuchJob(f"{ref!r} matches several jobs: {', '.join(sorted(by_server_id))}")
        prefix = ref.lower()
        usable_prefix = len(prefix) >= MIN_PREFIX and re.fullmatch(r"[0-9a-f-]+", prefix)
        by_prefix = self._by_prefix(data, prefix) if usable_prefix else {}
        if by_server_id:
            # One job's server_id and another's local_id prefix: a guess either way could
            # delete somebody else's job (section 2), so neither wins.
            both = {**by_prefix, **by_server_id}
            if len(both) > 1:
                raise NoSuchJob(
                    f"{ref!r} is ambiguous: the server_id of {', '.join(sorted(by_server_id))} "
                    f"and a prefix of {', '.join(sorted(set(by_prefix) - set(by_server_id)))}; "
                    "give the full local_id"
                )
            return next(iter(by_server_id.values()))
        if not usable_prefix:
            raise NoSuchJob(
                f"no job matches {ref!r} (give a local_id, a server_id, or at least "
                f"{MIN_PREFIX} characters of a local_id)"
            )
        if len(by_prefix) == 1:
            return next(iter(by_prefix.values()))
        if len(by_prefix) > 1:
            raise NoSuchJob(f"{ref!r} matches several jobs: {', '.join(sorted(by_prefix))}")
        raise NoSuchJob(f"no job matches {ref!r}")

    def _by_server_id(self, data: Any, ref: str) -> dict[str, Job]:
        matches = {job.local_id: job for job in self._bound_to(data, ref)}
        if len(matches) > 1:
            # A store older than the one-binding invariant: the id belongs to the job a load
            # keeps it on (_enforce_one_binding), so `show ID` and `list` agree.
            keeper = min(matches.values(), key=_keeper_order)
            return {keeper.local_id: keeper}
        return matches

    def _by_prefix(self, data: Any, prefix: str) -> dict[str, Job]:
        needle = b'\n{"local_id":"' + prefix.encode()
        candidates = set()
        if data[: len(needle) - 1] == needle[1:]:
            candidates.add(data[13:49].decode())
        pos = data.find(needle)
        while pos != -1:
            candidates.add(data[pos + 14 : pos + 50].decode())
            pos = data.find(needle, pos + 1)
        live = {}
        for local_id in candidates:
            found = self._fold_one(data, local_id)
            if found is not None:
                live[local_id] = found
        return live

    # ---- looking jobs up one by one without folding (a pass that applies a few changes) ---
    def lookup(self, local_id: str) -> Job | None:
        """The job `local_id` as the file holds it now, without folding the store."""
        if self._loaded:
            return self.refresh().get(local_id)
        with self.mapped() as data:
            return None if data is None else self._fold_one(data, local_id)

    def lookup_server_id(self, server_id: str) -> Job | None:
        """The job bound to `server_id` now (the first found; the store holds one at most)."""
        if self._loaded:
            for job in self.refresh().values():
                if job.server_id == server_id:
                    return job
            return None
        with self.mapped() as data:
            if data is None:
                return None
            return next(self._bound_to(data, server_id), None)

    def synced_jobs_besides(self, excluded: set[str], enough: int) -> int | None:
        """How many jobs are `synced` now other than `excluded` local_ids, counted up to
        `enough`; None when that cannot be told cheaply (then fold and count)."""
        if self._loaded:
            return sum(
                1
                for j in self.refresh().values()
                if j.sync_status == "synced" and j.local_id not in excluded
            )
        needle = b'"sync_status":"synced"'
        found: set[bytes] = set()
        checks = 0
        with self.mapped() as data:
            if data is None:
                return 0
            pos = data.rfind(needle)  # newest lines first: most likely still current
            while pos != -1 and len(found) < enough:
                start, end = _line_at(data, pos)
                head = data[start : start + 50]
                if not head.startswith(b'{"local_id":"') or head[49:50] != b'"':
                    return None
                checks += 1
                if checks > _MAX_STALE_CHECKS:
                    return None
                local_id = head[13:49]
                if local_id not in found and local_id.decode() not in excluded:
                    last = max(data.rfind(b"\n" + head) + 1, start)
                    if needle in data[last : _line_at(data, last)[1]]:
                        found.add(local_id)
                pos = data.rfind(needle, 0, start)
        return len(found)

    @classmethod
    def _bound_to(cls, data: Any, server_id: str) -> Iterator[Job]:
        """The jobs whose latest record holds `server_id`, found in place (a line of any of them
        may name it; the server_id is the second key, right after the 36-character local_id)."""
        needle = b'","server_id":' + json.dumps(server_id, ensure_ascii=False).encode() + b","
        head = b'{"local_id":"'
        pos = data.find(needle)
        while pos != -1:
            start = data.rfind(b"\n", 0, pos) + 1
            if data[start : start + len(head)] == head and pos == start + len(head) + 36:
                found = cls._fold_one(data, data[start + len(head) : pos].decode())
                if found is not None and found.server_id == server_id:
                    yield found
            pos = data.find(needle, pos + 1)

    @staticmethod
    def _fold_one(data: Any, local_id: str) -> Job | None:
        needle = b'{"local_id":' + json.dumps(local_id).encode()
        positions = [0] if data[: len(needle)] == needle else []
        needle = b"\n" + needle
        pos = data.find(needle)
        while pos != -1:
            positions.append(pos + 1)
            pos = data.find(needle, pos + 1)
        rec: dict[str, Any] | None = None
        for start in positions:
            end = data.find(b"\n", start)
            if end == -1:
                continue  # a torn last line
            try:
                candidate = json.loads(data[start:end])
            except ValueError:
                continue
            if _valid_record(candidate) and candidate["local_id"] == local_id:
                rec = candidate
        if rec is None or rec.get("purged"):
            return None
        try:
            return Job.from_record(rec)
        except TypeError:
            return None

    # ---- writing --------------------------------------------------------------------------
    def append(
        self,
        jobs: Iterable[Job] = (),
        purge: Iterable[str] = (),
        compact: bool = True,
        adopt: bool = False,
    ) -> None:
        """Append the new state of `jobs` and tombstones for `purge`, as one fsynced write.
        `compact` False: no automatic compaction now (a sync pass writes every job it pushes
        twice, and compacts once at its end rather than every time the dead lines add up).
        `adopt`: a loaded store keeps these very job objects (Job.as_stored) instead of
        parsing them back from their records; the caller never changes them afterwards."""
        jobs = list(jobs)
        tombstones = [tombstone(i) for i in purge]
        if not jobs and not tombstones:
            return
        lines = [j.record_json() for j in jobs]
        lines += [compact_json(t) for t in tombstones]
        blob = ("\n".join(lines) + "\n").encode()
        del lines
        with self.lock:
            if not self._loaded and os.path.lexists(self.repair_marker):
                self.load()  # a reader found unreadable lines: this write drops them
            if self._loaded:
                self.refresh()
                if self._needs_repair:
                    self._fold([j.record() for j in jobs] + tombstones)
                    self._rewrite()
                    return
            self._append_blob(blob)
            if self._loaded:
                if adopt:
                    for job in jobs:
                        self.jobs[job.local_id] = job.as_stored()
                    self._fold(tombstones)
                else:
                    self._fold([j.record() for j in jobs] + tombstones)
                self._offset += len(blob)
                self._lines += len(jobs) + len(tombstones)
                if (
                    compact
                    and self._lines > 2 * len(self.jobs)
                    and self._lines >= AUTO_COMPACT_MIN_LINES
                ):
                    self._rewrite()

    def _append_blob(self, blob: bytes) -> None:
        fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A torn last line from an interrupted write: cut it off before appending.
                back = min(size, 1 << 16)
                tail = os.pread(fd, back, size - back)
                cut = tail.rfind(b"\n")
                good = size - back + cut + 1 if cut != -1 else (0 if back == size else None)
                if good is None:
                    raise JobsyncdError(
                        f"{self.path}: a line longer than 64 KiB is torn; run `jobsyncd compact`"
                    )
                os.ftruncate(fd, good)
                self._warn_once(f"repaired:{good}", f"{self.path}: repaired a torn last line")
                if self._loaded:
                    self._offset = min(self._offset, good)
                size = good
            if size:
                self._cut_unreadable_last_line(fd, size)
            _write_all(fd, blob)
            os.fsync(fd)
        except OSError as exc:
            raise JobsyncdError(f"cannot write {self.path}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def _cut_unreadable_last_line(self, fd: int, size: int) -> None:
        back = min(size, 1 << 16)
        tail = os.pread(fd, back, size - back)
        start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
        if start == 0 and back < size:
            return  # a last line longer than 64 KiB: left to a reader's check
        line = tail[start:-1]
        try:
            ok = _valid_record(json.loads(line)) if line.strip() else True
        except ValueError:
            ok = False
        if not ok:
            self._set_aside(line)
            os.ftruncate(fd, size - back + start)
            self._warn_once(f"cut:{size}", f"{self.path}: repaired an unreadable last line")
            if self._loaded:
                self._offset = min(self._offset, size - back + start)

    def compact_if_worth_it(self) -> None:
        """Compact a loaded store whose dead records outnumber its live ones."""
        with self.lock:
            if not self._loaded:
                return
            self.refresh()
            # A lower bar than after an append: the pass has folded the store already, and a
            # store without stale lines lets the next no-change pass skip folding it.
            if 4 * self._lines > 5 * len(self.jobs) and self._lines >= AUTO_COMPACT_MIN_LINES:
                self._rewrite()

    def compact(self) -> tuple[int, int]:
        """Rewrite the store with only live records. Returns (lines before, lines after)."""
        with self.lock:
            self.load()
            before = self._lines
            self._rewrite()
            return before, len(self.jobs)

    def _rewrite(self) -> None:
        if os.path.islink(self.tmp_path):
            raise SymlinkRefused(self.tmp_path)
        if os.path.lexists(self.tmp_path):
            os.unlink(self.tmp_path)  # our own temporary file, left by a crash
        fd = open_nofollow(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        size = 0
        try:
            # Written a few thousand records at a time: a store of 100,000 jobs is never held
            # as lines in memory (twice, with the join), beside the jobs themselves.
            jobs = iter(self.jobs.values())
            while piece := "".join(j.record_json() + "\n" for j in islice(jobs, 4096)):
                data = piece.encode()
                _write_all(fd, data)
                size += len(data)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(self.tmp_path)
            raise JobsyncdError(f"cannot write {self.tmp_path}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            os.unlink(self.tmp_path)
            raise
        os.close(fd)
        if os.path.islink(self.path):
            os.unlink(self.tmp_path)
            raise SymlinkRefused(self.path)
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.data_dir)
        if self._loaded:
            self._release_held()
            self._held_fd = open_nofollow(self.path, os.O_RDONLY)
        if os.path.lexists(self.repair_marker):
            _unlink_quietly(self.repair_marker)
        self._offset = size
        self._lines = len(self.jobs)
        self._needs_repair = False


_DUE_NEEDLES = (b'"sync_status":"pending', b'"sync_status":"error"')
_MAX_STALE_CHECKS = 64


def _line_at(data: Any, pos: int) -> tuple[int, int]:
    start = data.rfind(b"\n", 0, pos) + 1
    end = data.find(b"\n", pos)
    return start, (len(data) if end == -1 else end)


def _may_hold_due_jobs(data: Any) -> bool:
    # No job found due among the first _MAX_STALE_CHECKS named ones: [] (False); a due one,
    # or more to check, or a layout not ours: None (True: fold and see).
    return _due_candidates(data, 0, _MAX_STALE_CHECKS) != []


def _keeper_order(job: Job) -> tuple[bool, bool, str, str]:
    deleting = job.sync_status == "pending_deletion"
    return (deleting, job.sync_status == "synced", job.created_at, job.local_id)


def _due_candidates(data: Any, limit: int, max_checks: int | None = None) -> list[str] | None:
    """The local_ids whose latest line has a status that needs a push, by byte search; None
    when more than `limit` are due, more than `max_checks` (4 x limit) jobs had to be looked
    at, or a line is not of our layout."""
    max_checks = 4 * limit if max_checks is None else max_checks
    found: list[str] = []
    checked: set[bytes] = set()
    for needle in _DUE_NEEDLES:
        pos = data.find(needle)
        while pos != -1:
            start, end = _line_at(data, pos)
            head = data[start : start + 50]  # {"local_id":"<36 characters>"
            if not head.startswith(b'{"local_id":"') or head[49:50] != b'"':
                return None
            if head not in checked:
                checked.add(head)
                if len(checked) > max_checks:
                    return None
                last = max(data.rfind(b"\n" + head) + 1, start)
                line = data[last : _line_at(data, last)[1]]
                if any(n in line for n in _DUE_NEEDLES):
                    found.append(head[13:49].decode())
                    if len(found) > limit:
                        return None
            pos = data.find(needle, end)
    return found


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_all(fd: int, blob: bytes) -> None:
    view = memoryview(blob)
    while view:
        written = os.write(fd, view)
        view = view[written:]
