"""The JSON-lines job store (`jobs.jsonl`): append, fold, find, compact, lock, repair.

Each line is a whole job record (or a `purged` tombstone); later lines supersede earlier ones.
Writers serialise on `jobs.lock` (flock); every append is one write of whole lines, fsynced;
compaction writes a temporary file, fsyncs it and renames it over the store (then fsyncs the
directory), so a crash at any instant leaves the old store or the new one, never a mix.
The line format and the byte searches that find jobs without folding live in storeformat.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import accumulate
from typing import Any

from .checked import (  # noqa: F401 - CHECKED_NAME, INDEX_NAME: callers find them here too
    CHECKED_NAME,
    CHUNK_LINES,
    INDEX_NAME,
    MAX_CHUNKS,
    IndexFile,
    Record,
    crc32,
    decode_index,
    encode_chunk,
    forget,
    read_checked_bytes,
    read_index,
    read_record,
    write_index,
    write_record,
)
from .errors import JobsyncdError, NoSuchJob, SymlinkRefused
from .fsutil import (
    FileLock,
    fsync_dir,
    open_nofollow,
    prepare_data_dir,  # noqa: F401 - re-exported: callers have always found it here
    write_file_atomically,
)
from .fsutil import write_all as _write_all  # a module global: tests make it fail here
from .jobtable import Entries, JobTable, due_ids, index_lines
from .model import Job
from .storeformat import (
    FEW_HEADS,
    FileView,
    due_candidates,
    encode_held,
    encode_lines,
    encode_record,  # noqa: F401 - re-exported: callers have always found it here
    head_of,
    holdable,
    holdable_id,
    ids_naming_server_id,
    ids_with_prefix,
    latest_record,
    synced_ids,
    tombstone,
    valid_record,
)

STORE_NAME = "jobs.jsonl"
LOCK_NAME = "jobs.lock"
TMP_NAME = "jobs.jsonl.tmp"
# Left by a reader that found unreadable lines, so that the next write of any process (even a
# CLI command that never folds the store) rewrites the store without them.
REPAIR_NAME = "jobs.jsonl.repair"
# What the last look found due, up to which byte of which file: the next look reads only the
# lines appended since (a hint, checked against the file before use; format free, contract 4).
HINT_NAME = "jobs.hint.json"
# CHECKED_NAME and INDEX_NAME (checked.py): which bytes at the store's start are lines exactly
# as this version writes them, and where each is: a lazy fold (a sync pass) holds those unparsed.
MIN_PREFIX = 6
# Compact automatically when dead records outweigh live ones, once the file has this many lines.
AUTO_COMPACT_MIN_LINES = 200


def _default_warn(message: str) -> None:
    print(f"jobsyncd: warning: {message}", file=sys.stderr)


class Store:
    """The store of one data dir. `load()` folds it; `refresh()` reads only what was appended."""

    def __init__(self, data_dir: str, warn: Callable[[str], None] = _default_warn) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, STORE_NAME)
        self.tmp_path = os.path.join(data_dir, TMP_NAME)
        self.repair_marker = os.path.join(data_dir, REPAIR_NAME)
        self.warn = warn
        self.lock = FileLock(os.path.join(data_dir, LOCK_NAME))
        self.jobs = JobTable()
        self._loaded = False
        # Fold lazily: lines an earlier fold checked (CHECKED_NAME) stay unparsed until asked for.
        self.fold_lazily = False
        # (device, inode, end, crc32): the file's bytes [0, end) are lines a fold found valid.
        self._checked: tuple[int, int, int, int] | None = None
        self._checked_saved: tuple[int, int, int, int] | None = None  # as CHECKED_NAME says
        # Their index (checked.py): the part INDEX_NAME holds (None: it is written anew), then
        # the chunks of the lines after it; None when no index describes the checked lines.
        self._index_base: IndexFile | None = None
        self._index_new: list[bytes] | None = None
        self._verified = Entries()  # the entries of the lines a verifying read went over
        # Whether lines folded since the load may bind a server id a second job holds: refresh()
        # folds other processes' lines without the one-binding check a load makes, so until
        # the next load a compaction must not record its output as checked (a lazy fold of it
        # would then never look for the duplicate).
        self._bindings_unchecked = False
        # prefetch(): the reading thread, and what it read (record, (device, inode), checked
        # bytes, index bytes), for the next lazy load.
        self._prefetch: (
            tuple[threading.Thread, list[tuple[Record, tuple[int, int], bytes | None, bytes | None]]]
            | None
        ) = None
        # While `_verifying`, _parse() clears `_all_holdable` on a line a lazy fold could not
        # hold as it is (storeformat.holdable): such lines never enter the checked range.
        self._verifying = False
        self._all_holdable = True
        # The file as last read, held open: while we hold it its inode cannot be reused, so a
        # compaction by another process (a new inode at the path) is always noticed.
        self._held_fd: int | None = None
        self._offset = 0  # end of the last complete line folded
        self._lines = 0  # records in the file (live and dead)
        self._needs_repair = False  # torn tail or corrupt lines: the next write compacts
        self._warned: set[str] = set()
        self._hint: dict[str, Any] | None = None  # see HINT_NAME
        self._mapped_ident: tuple[int, int] = (0, 0)
        # lookup()'s answers for the file as it was (device, inode, size, mtime and its last
        # bytes, which any write in between would change): a pass that reads a job, then
        # re-reads it under the lock to apply an outcome, searches for it once.
        self._looked_up: dict[str, tuple[tuple[Any, ...], Job | None]] = {}

    @contextmanager
    def locked(self) -> Iterator[Store]:
        with self.lock:
            yield self

    # ---- reading -------------------------------------------------------------------------
    def _read_and_parse(
        self, fd: int, start: int, crc: int = 0, verify: bool = False
    ) -> tuple[int, int, bool, int]:
        """Fold the file from `start` on, read in blocks so that a large store is never held in
        memory whole; returns (records folded, length of the complete lines, any line bad, the
        CRC-32 of those lines continuing `crc`, which only `verify` computes). `verify`:
        `_all_holdable` says afterwards whether every line read may join a checked range, and
        `_verified` holds their index entries."""
        self._verifying, self._all_holdable = verify, True
        self._verified = Entries()
        try:
            return self._read_blocks(fd, start, crc)
        finally:
            self._verifying = False

    def _read_blocks(self, fd: int, start: int, crc: int) -> tuple[int, int, bool, int]:
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
            else:
                count, cut, was_bad = self._parse(data, base, final=True)
            if self._verifying and self._all_holdable:  # lines that may join a checked range
                crc = crc32(memoryview(data)[:cut], crc)
                entries = index_lines(data[:cut], base)
                if entries is None:
                    self._all_holdable = False
                else:
                    self._verified.extend(entries)
            pending = data[cut:]
            total += count
            bad = bad or was_bad
            current = following
        return total, offset - len(pending) - start, bad, crc

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
                if all(valid_record(r) for r in parsed):
                    if self._verifying:
                        self._verify(piece, parsed)
                    self._fold(parsed)
                    count += len(parsed)
                    continue
            except ValueError:
                pass
            self._all_holdable = False  # blank or bad lines: not as this version writes them
            chunk = [ln for ln in piece.split(b"\n") if ln.strip()]
            if not chunk:
                continue
            try:
                parsed = json.loads(b"[" + b",".join(chunk) + b"]")
                if all(valid_record(r) for r in parsed):
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
                if valid_record(rec):
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

    def _verify(self, piece: bytes, parsed: list[dict[str, Any]]) -> None:
        lines = piece[:-1].split(b"\n")
        if len(lines) != len(parsed) or not all(map(holdable, lines, parsed)):
            self._all_holdable = False

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
        # A table of parsed jobs only (an eager fold) takes them straight into its dict.
        plain = jobs.plain()
        into: Any = jobs if plain is None else plain
        for rec in records:
            local_id = rec["local_id"]
            if rec.get("purged"):
                jobs.discard(local_id)
            else:
                try:
                    into[local_id] = Job.from_record(rec)
                except TypeError:
                    self._needs_repair = True

    def load(self) -> JobTable:
        """Fold the whole store into `self.jobs` (under the lock)."""
        with self.lock:
            self._release_held()
            try:
                fd = open_nofollow(self.path, os.O_RDONLY)
            except JobsyncdError:
                if os.path.lexists(self.path):
                    raise
                fd = None
            self.jobs = JobTable()
            self._needs_repair = False
            self._bindings_unchecked = False  # the load checks them (_enforce_one_binding)
            self._checked = None
            count = end = crc = 0
            bad = False
            checked = self._fold_checked(fd) if fd is not None and self.fold_lazily else None
            self.drop_prefetch()  # read for no use: not a lazy fold, or no store
            if fd is not None:
                count, end, crc = checked or (0, 0, 0)
                # The lines after the checked ones: folded (and checked for holding) as usual.
                self.jobs.watch = checked is not None
                more, length, bad, crc = self._read_and_parse(fd, end, crc, checked is not None)
                self.jobs.watch = False
                if checked is not None:
                    st = os.fstat(fd)
                    self._checked = (st.st_dev, st.st_ino, end, checked[2])
                    if self._all_holdable:
                        self._checked = (st.st_dev, st.st_ino, end + length, crc)
                        self._index_add(self._verified)
                count, end = count + more, end + length
            self._held_fd, self._offset, self._lines = fd, end, count
            # The checked lines held one binding per server_id (their fold repaired nothing, and
            # a pass binds through its journal): only a job that came to hold a server_id since
            # can break it, and only then are all jobs looked at.
            must_check = not self.jobs.raw_count or self.jobs.new_bindings
            repaired = must_check and self._enforce_one_binding()
            self._needs_repair = self._needs_repair or bad or repaired
            self._loaded = True
            if not bad and os.path.lexists(self.repair_marker):
                _unlink_quietly(self.repair_marker)
            if self._needs_repair:
                self._checked = None
            elif self._checked is not None:
                self._save_checked()
        return self.jobs

    def _fold_checked(self, fd: int) -> tuple[int, int, int] | None:
        """Hold the lines an earlier fold checked (CHECKED_NAME) as raw lines in a new
        `self.jobs`, if the file still starts with those very bytes; returns (records, where
        they end, their CRC-32), or None (then fold it all). Where the lines are comes from the
        index (INDEX_NAME) if it is as the record says, else from the lines themselves (and
        the index is made anew)."""
        prefetched = self._take_prefetch()
        record = read_record(self.data_dir)
        st = os.fstat(fd)
        if record is None or (record.dev, record.ino) != (st.st_dev, st.st_ino):
            return None
        self._checked_saved = (record.dev, record.ino, record.end, record.crc)
        end = record.end
        if end > st.st_size:
            return None
        index = record.index_file
        if prefetched is not None and prefetched[:2] == (record, (st.st_dev, st.st_ino)):
            buffer, index_bytes = prefetched[2:]  # read of this very record and file
        else:
            buffer, index_bytes = self._read_checked(fd, record)
        if buffer is None:
            return None
        entries = None
        if index is not None and index_bytes is not None:
            entries = decode_index(index_bytes, index, end)
        table = JobTable()
        if index is not None and entries is not None:
            self._index_base, self._index_new = index, []
            if index.chunks > MAX_CHUNKS:  # many small passes: one chunk again
                self._index_base, self._index_new = None, [encode_chunk(entries)]
        else:
            entries = index_lines(buffer)
            if entries is None:
                return None
            self._index_base, self._index_new = None, [encode_chunk(entries)]
        count = table.hold(buffer, entries)
        table.on_broken = self._forget_checked
        self.jobs = table
        return count, end, record.crc

    def _read_checked(self, fd: int, record: Record) -> tuple[bytes | None, bytes | None]:
        """(the checked bytes, the index's bytes), each None unless as the record says. The
        checked bytes are read and their CRC worked out in a thread while this one reads the
        index (a read and a CRC leave the GIL): 100,000 jobs held in about half the time."""
        read: list[bytes | None] = []
        reader = threading.Thread(target=_quietly, args=(read, read_checked_bytes, fd, record))
        reader.start()
        try:
            index = record.index_file
            index_bytes = None if index is None else read_index(self.data_dir, index)
        finally:
            reader.join()
        return (read[0] if read else None), index_bytes

    def prefetch(self) -> None:
        """Start reading what a lazy fold holds (the checked bytes and the index, with their
        CRCs) in a thread, while the caller does other work: a pass that will fold the store
        imports its HTTP client meanwhile. The next lazy load() uses what was read if the
        record and the file are still the same; drop_prefetch() forgets it."""
        self.drop_prefetch()
        out: list[tuple[Record, tuple[int, int], bytes | None, bytes | None]] = []

        def read() -> None:
            record = read_record(self.data_dir)
            if record is None:
                return
            try:
                fd = open_nofollow(self.path, os.O_RDONLY)
            except JobsyncdError:
                return
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (record.dev, record.ino):
                    return
                buffer, index_bytes = self._read_checked(fd, record)
                out.append((record, (st.st_dev, st.st_ino), buffer, index_bytes))
            finally:
                os.close(fd)

        thread = threading.Thread(
            target=_quietly, args=([], read), name="jobsyncd-prefetch", daemon=True
        )
        thread.start()
        self._prefetch = (thread, out)

    def drop_prefetch(self) -> None:
        self._take_prefetch()

    def _take_prefetch(self) -> tuple[Record, tuple[int, int], bytes | None, bytes | None] | None:
        """What prefetch() read (once read), forgotten here."""
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is None:
            return None
        prefetch[0].join()
        return prefetch[1][0] if prefetch[1] else None

    def _index_add(self, entries: Entries | None) -> None:
        """The checked range grew by these lines (None: lines of unknown places)."""
        if self._index_new is None:
            return
        if entries is None:
            self._index_new = None
        elif entries.ids:
            self._index_new.append(encode_chunk(entries))

    def _forget_checked(self) -> None:
        self._checked = self._checked_saved = None
        forget(self.data_dir)

    def _save_checked(self) -> None:
        """Write the record of the checked range, after the chunks of its index not saved yet
        (not fsynced: lost or torn by a crash, the next pass folds the store the old way)."""
        checked = self._checked
        if checked is None or (checked == self._checked_saved and not self._index_new):
            return
        index = None
        if self._index_new is not None:
            index = self._index_base
            if index is None or self._index_new:
                index = write_index(self.data_dir, self._index_new, self._index_base)
            self._index_base, self._index_new = index, [] if index is not None else None
        if write_record(self.data_dir, Record(*checked, index)):
            self._checked_saved = checked

    def _enforce_one_binding(self) -> bool:
        """The store's invariant (contract 6.3/6.4): one server_id never belongs to two local
        jobs. A store that breaks it (written by jobsyncd before 0.2, which could pull a job
        re-created on the server as a second local job) is repaired in memory, with a warning,
        and rewritten by the next write: the binding stays with the job holding a local change
        other than a deletion (else the oldest; a deletion of a duplicate must never delete the
        other's server copy); a `synced` duplicate is a mere copy of the server job and goes; any
        other loses its server_id (a pending one is then created anew, a deletion just drops).
        Returns whether anything was repaired."""
        first: dict[str, str] = {}
        groups: dict[str, list[str]] = {}
        for local_id, sid, _ in self.jobs.summaries():  # raw lines stay unparsed
            if sid is None:
                continue
            held = first.setdefault(sid, local_id)
            if held != local_id:
                groups.setdefault(sid, [held]).append(local_id)
        for sid, local_ids in groups.items():
            group = sorted((self.jobs[i] for i in local_ids), key=_keeper_order)
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
        """False only when no job's latest record has a status that needs a push (pending,
        pending_deletion, error), found without folding the store (see due_candidates); True
        when one has, or when too many lines name such a status to check (fold and see)."""
        return self.due_candidates(_MAX_STALE_CHECKS) != []

    def bound_once(self, server_id: str) -> bool:
        """Whether at most one job holds `server_id` (the invariant a load repairs)."""
        if self._loaded:
            return sum(1 for _, sid, _ in self.refresh().summaries() if sid == server_id) <= 1
        with self.mapped() as data:
            if data is None:
                return True
            return len({j.local_id for j in self._bound_to(data, server_id)}) <= 1

    def due_candidates(self, limit: int) -> list[str] | None:
        """The local_ids whose latest record has a status that needs a push, without folding:
        each line naming such a status is found by byte search and its job's latest record read
        (backwards from the end); None when more than `limit` are due, or 4 x `limit` jobs had
        to be read, or a line is not of our layout: then fold and see.

        The answer is kept as a hint (in memory and in HINT_NAME) with the byte it holds up to,
        so the next look searches only the lines appended since and checks the jobs it found."""
        with self.mapped() as data:
            if data is None:
                return []
            hint = self._usable_hint(data)
            if hint is None:
                found = due_candidates(data, limit, few_heads=_FEW_HEADS)
            else:
                found = due_candidates(
                    data, limit, start=hint["end"], known=hint["due"], few_heads=_FEW_HEADS
                )
            if found is not None:
                self._keep_hint(data, found, hint)
            return found

    def _usable_hint(self, data: Any) -> dict[str, Any] | None:
        """The kept hint if it still describes this file's first `end` bytes: same file (device
        and inode), not shorter, and the same bytes at its start and just before `end` (an inode
        reused by a compaction holds other bytes there)."""
        hint = self._hint if self._hint is not None else self._read_hint()
        if hint is None or hint["ident"] != list(self._mapped_ident):
            return None
        end = hint["end"]
        if end > len(data) or data[:_HINT_PROBE] != hint["head"]:
            return None
        if data[max(0, end - _HINT_PROBE) : end] != hint["tail"]:
            return None
        return hint

    def _read_hint(self) -> dict[str, Any] | None:
        try:
            fd = open_nofollow(os.path.join(self.data_dir, HINT_NAME), os.O_RDONLY)
        except JobsyncdError:
            return None
        try:
            raw = json.loads(os.read(fd, 1 << 16))
            hint = {
                "ident": [int(raw["ident"][0]), int(raw["ident"][1])],
                "end": int(raw["end"]),
                "head": bytes.fromhex(raw["head"]),
                "tail": bytes.fromhex(raw["tail"]),
                "due": [str(i) for i in raw["due"] if isinstance(i, str) and len(i) == 36],
            }
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None  # a hint torn by a crash, or not ours: search the whole file
        finally:
            os.close(fd)
        self._hint = hint
        return hint

    def _keep_hint(self, data: Any, due: list[str], old: dict[str, Any] | None) -> None:
        end = data.rfind(b"\n") + 1  # whole lines only: a torn last line may still change
        if old is not None and old["end"] == end and sorted(old["due"]) == sorted(due):
            return
        hint = {
            "ident": list(self._mapped_ident),
            "end": end,
            "head": bytes(data[:_HINT_PROBE]),
            "tail": bytes(data[max(0, end - _HINT_PROBE) : end]),
            "due": sorted(due),
        }
        self._hint = hint
        shown = {**hint, "head": hint["head"].hex(), "tail": hint["tail"].hex()}
        try:  # not fsynced: a hint lost or torn by a crash only costs one whole search
            write_file_atomically(self.data_dir, HINT_NAME, json.dumps(shown).encode())
        except JobsyncdError:
            pass

    @contextmanager
    def mapped(self) -> Iterator[Any]:
        """The store file as a read-only FileView, under the lock (None when missing or empty).

        Searched in chunks read from the page cache: bytes.find finds a job's lines among
        100,000 in a few milliseconds, and the process's memory does not grow with the file
        (an mmap counted every page searched in the process's resident memory)."""
        with self.lock:
            try:
                fd = open_nofollow(self.path, os.O_RDONLY)
            except JobsyncdError:
                if os.path.lexists(self.path):
                    raise
                yield None
                return
            try:
                st = os.fstat(fd)
                if not st.st_size:
                    yield None
                    return
                self._mapped_ident = (st.st_dev, st.st_ino)
                yield FileView(fd, st.st_size)
            finally:
                os.close(fd)

    def unload(self) -> None:
        """Forget the folded jobs (a long-lived process between passes)."""
        with self.lock:
            self._release_held()
            self.jobs = JobTable()
            self._loaded = False

    def _release_held(self) -> None:
        if self._held_fd is not None:
            os.close(self._held_fd)
            self._held_fd = None

    def refresh(self) -> JobTable:
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
            checked = self._checked
            extend = checked is not None and checked[2] == self._offset
            crc = checked[3] if checked is not None and extend else 0
            # Another process's lines: they join the checked range only if written as this
            # version writes them and binding no server id anew (a load checks those).
            self.jobs.watch, self.jobs.new_bindings = True, False
            try:
                count, end, bad, crc = self._read_and_parse(
                    self._held_fd, self._offset, crc, extend
                )
            finally:
                self.jobs.watch = False
            self._offset += end
            self._lines += count
            self._needs_repair = self._needs_repair or bad
            self._bindings_unchecked = self._bindings_unchecked or self.jobs.new_bindings
            holdable = self._all_holdable and not self.jobs.new_bindings
            if checked is not None and extend and holdable and not self._needs_repair:
                self._checked = (checked[0], checked[1], self._offset, crc)
                self._index_add(self._verified)
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
        candidates = ids_with_prefix(data, prefix)
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
            if data is None:
                return None
            st = os.fstat(data.fd)
            version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, data[-_HINT_PROBE:])
            known = self._looked_up.get(local_id)
            if known is not None and known[0] == version:
                job = known[1]
            else:
                job = self._fold_one(data, local_id)
                if len(self._looked_up) >= _LOOKUP_CACHE:
                    self._looked_up.clear()
                self._looked_up[local_id] = (version, job)
            return job.copy() if job is not None else None

    def lookup_server_id(self, server_id: str) -> Job | None:
        """The job bound to `server_id` now (the first found; the store holds one at most)."""
        if self._loaded:
            jobs = self.refresh()
            for local_id, sid, _ in jobs.summaries():
                if sid == server_id:
                    return jobs[local_id]
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
                for local_id, _, status in self.refresh().summaries()
                if status == "synced" and local_id not in excluded
            )
        with self.mapped() as data:
            if data is None:
                return 0
            found = synced_ids(data, excluded, enough, _MAX_STALE_CHECKS)
        return None if found is None else len(found)

    @classmethod
    def _bound_to(cls, data: Any, server_id: str) -> Iterator[Job]:
        """The jobs whose latest record holds `server_id`, found in place (a line of any of them
        may name it; the server_id is the second key, right after the 36-character local_id)."""
        for local_id in ids_naming_server_id(data, server_id):
            found = cls._fold_one(data, local_id)
            if found is not None and found.server_id == server_id:
                yield found

    @staticmethod
    def _fold_one(data: Any, local_id: str) -> Job | None:
        rec = latest_record(data, head_of(local_id), local_id)
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
        purge_ids = list(purge)
        tombstones = [tombstone(i) for i in purge_ids]
        if not jobs and not tombstones:
            return
        blob = encode_lines(jobs, tombstones)
        with self.lock:
            if not self._loaded and os.path.lexists(self.repair_marker):
                self.load()  # a reader found unreadable lines: this write drops them
            if self._loaded:
                self.refresh()
                if self._needs_repair:
                    self._fold([j.record() for j in jobs] + tombstones)
                    self._rewrite()
                    return
            written_at = self._append_blob(blob)
            if self._loaded:
                checked = self._checked
                ids_ok = all(holdable_id(j.local_id) for j in jobs) and all(
                    holdable_id(i) for i in purge_ids
                )
                if checked is not None and checked[2] == written_at == self._offset and ids_ok:
                    # Lines we encoded from jobs: as a fold would check them, so still checked.
                    end = written_at + len(blob)
                    self._checked = (checked[0], checked[1], end, crc32(blob, checked[3]))
                    self._index_add(index_lines(blob, written_at))
                if adopt:
                    plain = self.jobs.plain()
                    into: Any = self.jobs if plain is None else plain
                    for job in jobs:
                        into[job.local_id] = job.as_stored()
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

    def _append_blob(self, blob: bytes) -> int:
        """Append `blob` (fsynced); returns the offset it was written at."""
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
            return size
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
            ok = valid_record(json.loads(line)) if line.strip() else True
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
            if self.fold_lazily:
                self._save_checked()  # what this pass appended is checked for the next one
                self._keep_due_hint()

    def _keep_due_hint(self) -> None:
        """At a pass's end (under the lock, the store folded up to its last whole line): the
        jobs whose status needs a push are known, so they are kept as the due hint, and the
        next pass's look (due_candidates) searches the lines appended since, not the whole
        store (15-20 ms at 100,000 jobs, twice). Not when many are due, or lines were bad."""
        if self._needs_repair or self._held_fd is None:
            return
        due = self.jobs.due_ids(_MAX_STALE_CHECKS)
        if due is None:
            return
        held = os.fstat(self._held_fd)
        with self.mapped() as data:
            if data is None or self._mapped_ident != (held.st_dev, held.st_ino):
                return
            if data.rfind(b"\n") + 1 != self._offset:
                return  # not what the table holds (cannot happen under the lock)
            self._keep_hint(data, due, self._hint)

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
        size = crc = 0
        entries, chunks = Entries(), []  # the index: lines not encoded yet, chunks encoded
        try:
            # Written a few thousand records at a time: a store of 100,000 jobs is never held
            # as lines in memory (twice, with the join), beside the jobs themselves. A job
            # still held as its raw line (a lazy fold) is written as that line, unparsed.
            holdable_ids = self.jobs.ids_holdable()
            for ids, held in self.jobs.in_order(4096):
                lines = encode_held(held)
                data = b"\n".join(lines) + b"\n"
                _write_all(fd, data)
                if holdable_ids:  # the index of the lines, from what is known of them
                    starts = list(accumulate([len(line) + 1 for line in lines], initial=size))
                    entries.extend(Entries(ids, starts[:-1], due_ids(data, ids, lines)))
                    if len(entries.ids) >= CHUNK_LINES:
                        chunks.append(encode_chunk(entries))
                        entries = Entries()
                    crc = crc32(data, crc)
                size += len(data)
            os.fsync(fd)
            st = os.fstat(fd)
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
        # Lines we encoded (or held as checked): a lazy fold may hold them, if their ids allow.
        self._checked = None
        if holdable_ids and not self._bindings_unchecked:
            self._checked = (st.st_dev, st.st_ino, size, crc)
            if entries.ids or not chunks:
                chunks.append(encode_chunk(entries))
            self._index_base, self._index_new = None, chunks
        self._save_checked()


_MAX_STALE_CHECKS = 64
_LOOKUP_CACHE = 1024  # jobs remembered by lookup() for an unchanged file
# Passed to every due search rather than left to storeformat's default: tests set it here to
# take either path (one scan of the file, or each job backwards from the end).
_FEW_HEADS = FEW_HEADS
_HINT_PROBE = 256  # bytes compared at the file's start and before the hint's end


def _quietly(out: list[Any], work: Callable[..., Any], *args: Any) -> None:
    """A reading thread's body: what `work` returns goes to `out`; nothing goes on failing
    (no traceback from a thread reaches the user: whoever waits for it reads for itself)."""
    try:
        out.append(work(*args))
    except Exception:  # the caller's own read then meets and reports it
        pass


def _keeper_order(job: Job) -> tuple[bool, bool, str, str]:
    deleting = job.sync_status == "pending_deletion"
    return (deleting, job.sync_status == "synced", job.created_at, job.local_id)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
