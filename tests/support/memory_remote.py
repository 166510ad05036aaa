"""An in-memory job server and a `RemoteAPI` client of it, with the reference server's semantics.

`MemoryServer` keeps one user's jobs as the reference server's storage does (jobsyncd/server/
storage/base.py): server ids, the listing in creation order with an ETag that changes with every
write, idempotent creates by local_id, a change counter per write, tombstones, checkpoints tied
to a history. Values are checked by the reference server's own validation module, and every
answer goes through the agent's own parser (`remote.parse_server_job`), so a `MemoryRemote`
answers what `remote.Remote` would make of the reference server's HTTP answers: the same
ServerJobs, the same error kinds with the same messages.

For tests that play the world around the agent: another client's jobs (`MemoryServer.create`,
`update`, `delete`, and `plant` for a job the API would refuse), a server bug (`corrupt`),
backups and restores with `new-history` (`backup`, `restore`), and faults of the job routes as
tests/support/faultserver.py programs them (`MemoryRemote.add_fault`), raised as `remote.Remote`
raises what it reads of such an answer.

tests/test_sync_contract.py holds it and the real server to one suite of sync passes;
tests/test_sync_model.py runs its state machine against it and the FaultServer.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
import hashlib
import json
import os
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from jobsyncd.api import (
    AnswerTooLarge,
    AuthRefused,
    BackOff,
    BatchNotOffered,
    FeedGone,
    FeedNotOffered,
    FeedPage,
    Gone,
    HeldTest,
    InvalidJob,
    InvalidJobObject,
    NotModified,
    Permanent,
    RemoteError,
    ServerJob,
    Tombstone,
    Transient,
)
from jobsyncd.remote import (
    MAX_JOB_ANSWER_BYTES,
    MAX_PAGE_ANSWER_BYTES,
    _batch_answer,
    _invalid_job,
    _server_message,
    parse_retry_after,
    parse_server_job,
    unchanged_item,
)
from jobsyncd.server import validation
from jobsyncd.server.body import sanitise_filename
from jobsyncd.server.errors import HTTPError
from jobsyncd.upload import Uploader

NEW_JOB_STATUS = "submitted"
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
MAX_BATCH_OPERATIONS = 500


def _utc_now() -> str:
    moment = _dt.datetime.now(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _Diverged(Exception):
    pass


class MemoryServer:
    """The reference server's storage for one user, in memory. The methods named as the routes
    raise HTTPError as the routes answer; the others are for tests playing another client."""

    def __init__(self, offers_feed: bool = True, offers_batch: bool = True) -> None:
        self.offers_feed = offers_feed
        self.offers_batch = offers_batch
        # id -> [seq, change_seq, job object as the API shows it]; insertion order is seq order
        self.rows: dict[str, list[Any]] = {}
        self.tombstones: dict[str, tuple[str, int]] = {}  # id -> (local_id, change_seq)
        self.version = 0  # the change counter: one per create, change and delete
        self.seq = 0
        self.epoch = secrets.token_hex(4)
        self.history = secrets.token_hex(8)

    # ---- what the routes do ------------------------------------------------------------------
    def _bump(self) -> int:
        self.version += 1
        return self.version

    def _find_local(self, local_id: str) -> list[Any] | None:
        return next((r for r in self.rows.values() if r[2]["local_id"] == local_id), None)

    def create(
        self, local_id: Any, text: Any, metadata: Any, audio: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], bool]:
        """(job object, created): a local_id the user has already answers its job, unchanged."""
        local_id = validation.check_local_id(local_id)
        text = validation.check_text(text)
        metadata = validation.check_metadata(metadata)
        row = self._find_local(local_id)
        if row is not None:
            return copy.deepcopy(row[2]), False
        return self._insert(local_id, text, metadata, audio), True

    def _insert(
        self, local_id: str, text: str | None, metadata: dict[str, Any], audio: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Store a new job row (a change in the feed, a new ETag); returns a copy of it."""
        now = _utc_now()
        self.seq += 1
        job = {
            "id": str(uuid.uuid4()),
            "local_id": local_id,
            "text": text,
            "metadata": copy.deepcopy(metadata),
            "status": NEW_JOB_STATUS,
            "audio": audio,
            "created_at": now,
            "updated_at": now,
        }
        self.rows[job["id"]] = [self.seq, self._bump(), job]
        return copy.deepcopy(job)

    def update(
        self, job_id: str, changes: dict[str, Any], audio: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        row = self.rows.get(job_id)
        if row is None:
            raise HTTPError(404, "no such job")
        checked: dict[str, Any] = {}
        if "text" in changes:
            checked["text"] = validation.check_text(changes["text"])
        if "metadata" in changes:
            checked["metadata"] = copy.deepcopy(validation.check_metadata(changes["metadata"]))
        if "status" in changes:
            checked["status"] = validation.check_status(changes["status"])
        if audio is not None or "audio" in changes:
            checked["audio"] = audio
        if checked:  # an empty PATCH changes nothing: no new counter value, no new ETag
            row[2].update(checked, updated_at=_utc_now())
            row[1] = self._bump()
        return copy.deepcopy(row[2])

    def delete(self, job_id: str) -> None:
        row = self.rows.pop(job_id, None)
        if row is None:
            raise HTTPError(404, "no such job")
        self.tombstones[job_id] = (row[2]["local_id"], self._bump())

    def get(self, job_id: str) -> dict[str, Any]:
        row = self.rows.get(job_id)
        if row is None:
            raise HTTPError(404, "no such job")
        return copy.deepcopy(row[2])

    @property
    def etag(self) -> str:
        return f'"{self.epoch}-{self.version}"'

    def list_page(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int | None]:
        rows = [r for r in self.rows.values() if r[0] > after][: limit + 1]
        more = len(rows) > limit
        rows = rows[:limit]
        return [copy.deepcopy(r[2]) for r in rows], (rows[-1][0] if more and rows else None)

    def make_checkpoint(self, seq: int) -> str:
        return f"{self.history}:{seq}"

    def read_checkpoint(self, checkpoint: str) -> int:
        history, _, seq = checkpoint.partition(":")
        if history != self.history or not seq.isdigit():
            raise _Diverged()
        return int(seq)

    def changes(self, since: int | None, limit: int) -> tuple[list[dict[str, Any]], int, bool]:
        """(change objects, next counter, more): each job once, as its latest change."""
        if since is not None and since > self.version:
            raise _Diverged()
        after = -1 if since is None else since
        merged = sorted(
            [(r[1], copy.deepcopy(r[2])) for r in self.rows.values() if r[1] > after]
            + [
                (seq, {"id": job_id, "local_id": local_id, "deleted": True})
                for job_id, (local_id, seq) in self.tombstones.items()
                if seq > after
            ],
            key=lambda item: item[0],
        )
        more = len(merged) > limit
        if more:
            del merged[limit:]
            next_seq = merged[-1][0]
        else:
            next_seq = max(self.version, after, 0)
        return [obj for _, obj in merged], next_seq, more

    # ---- another client, and a server bug, for tests -----------------------------------------
    def jobs(self) -> dict[str, dict[str, Any]]:
        return {job_id: copy.deepcopy(r[2]) for job_id, r in self.rows.items()}

    def plant(self, local_id: str, text: str | None, metadata: dict[str, Any]) -> dict[str, Any]:
        """A job written into the storage without the API's checks (an import, an older
        server): for a `local_id` that is not a UUID, which a create would refuse (6.4)."""
        return self._insert(local_id, text, metadata, None)

    def backup(self) -> dict[str, Any]:
        """The whole state, as a copy of the database holds it (its ETag epoch and history
        included)."""
        return copy.deepcopy(
            {
                "rows": self.rows,
                "tombstones": self.tombstones,
                "version": self.version,
                "seq": self.seq,
                "epoch": self.epoch,
                "history": self.history,
            }
        )

    def restore(self, state: dict[str, Any], new_history: bool = True) -> None:
        """The database put back from `backup()`'s copy; `new_history` as `jobsyncd-server
        new-history` then gives it (a new history id and ETag epoch)."""
        state = copy.deepcopy(state)
        self.rows, self.tombstones = state["rows"], state["tombstones"]
        self.version, self.seq = state["version"], state["seq"]
        self.epoch, self.history = state["epoch"], state["history"]
        if new_history:
            self.history, self.epoch = secrets.token_hex(8), secrets.token_hex(4)

    @staticmethod
    def local_ids_of(state: dict[str, Any]) -> set[str]:
        """The local_ids of the jobs a backup holds."""
        return {row[2]["local_id"] for row in state["rows"].values()}

    def corrupt(self, job_id: str) -> None:
        """Serve the job with metadata that is not an object (a server bug): an invalid job
        object for the agent (contract 6.4). Counts as a change of the job."""
        row = self.rows[job_id]
        row[2]["metadata"] = []
        row[1] = self._bump()


# What a fault of tests/support/faultserver.py may do that has a meaning without HTTP.
# (Time, stalls and listing pages are the FaultServer's alone.)
_ANSWER_ACTIONS = ("garbage", "content_type", "huge")  # an answer the client cannot read
FAULT_ACTIONS = ("status", "headers", "drop_before", "drop_after_store", *_ANSWER_ACTIONS)


class Fault:
    """The next `times` requests of `method` on a path that `path` fullmatches fail by
    `action`; `hits` counts them."""

    def __init__(self, method: str, path: str, times: int, action: dict[str, Any]) -> None:
        unknown = set(action) - set(FAULT_ACTIONS)
        if unknown:
            raise TypeError(f"no such fault in memory: {sorted(unknown)}")
        status = action.get("status")
        if status is not None and not 400 <= int(status) <= 599:
            raise TypeError("a status fault in memory is a 4xx or 5xx")
        if status is None and not any(action.get(a) for a in FAULT_ACTIONS[2:]):  # not headers
            raise TypeError("a fault takes an action")
        self.method, self.times, self.action = method.upper(), times, dict(action)
        self.path = re.compile(path)
        self.hits = 0

    def takes(self, method: str, path: str) -> bool:
        return self.hits < self.times and method == self.method and bool(self.path.fullmatch(path))


def _broken(method: str, path: str) -> Transient:
    # requests' words for a connection closed without an answer, as remote.Remote quotes them.
    reason = (
        "('Connection aborted.', "
        "RemoteDisconnected('Remote end closed connection without response'))"
    )
    return Transient(f"{method} {path}: connection broken: {reason}")


def fault_answer(action: dict[str, Any], method: str, path: str) -> None:
    """Raise what `remote.Remote` raises on reading the answer a FaultServer's fault `action`
    gives (as `_send`, `_check_status` and `_json` check it, in that order); return when it
    takes the answer as done (a DELETE answered 404, or 200 with a JSON body)."""
    listing = method == "GET" and path == "/jobs"
    huge = action.get("huge")
    if huge and huge > (MAX_PAGE_ANSWER_BYTES if listing else MAX_JOB_ANSWER_BYTES):
        raise AnswerTooLarge(f"{method} {path}: the answer is too large ({huge} bytes)")
    status = int(action.get("status") or 200)
    if method == "DELETE" and (status == 404 or (status == 200 and not _unreadable(action))):
        return
    if status in (401, 403):
        raise AuthRefused(status)
    if status in (429, 503):
        retry_after = (action.get("headers") or {}).get("Retry-After")
        raise BackOff(status, parse_retry_after(retry_after))
    if status == 404:
        raise Gone(f"{method} {path}: not found on the server (404)")
    # The fault server's own error body, unless the fault replaced the body.
    injected = not any(action.get(a) for a in _ANSWER_ACTIONS)
    message = f": injected fault ({status})" if injected else ""
    if status >= 500:
        raise Transient(f"{method} {path}: server error {status}{message}")
    if status >= 400:
        raise Permanent(f"{method} {path}: refused by the server ({status}){message}")
    if action.get("content_type"):
        raise Transient(f"{method} {path}: the server answered {action['content_type']}, not JSON")
    raise Transient(f"{method} {path}: the server answered junk, not JSON")  # or JSON cut short


def _unreadable(action: dict[str, Any]) -> bool:
    return bool(action.get("garbage") or action.get("content_type") or action.get("huge"))


class MemoryRemote:
    """A `RemoteAPI` client of a MemoryServer: what `remote.Remote` makes of the reference
    server's answers, without HTTP. It carries no resumable uploads (audio goes with the job)."""

    def __init__(self, server: MemoryServer | None = None, page_limit: int | None = None) -> None:
        self.server = server if server is not None else MemoryServer()
        self.page_limit = page_limit
        self.closed = False
        self.faults: list[Fault] = []

    # ---- faults, as tests/support/faultserver.py programs them -------------------------------
    def add_fault(self, method: str, path: str, times: int = 1, **action: Any) -> Fault:
        """Fail the next `times` requests of `method` on a job route (POST and GET "/jobs", GET,
        PATCH and DELETE "/jobs/{id}"; the feed and batches take no fault) whose path `path`, a
        regular expression, fullmatches; the first programmed fault that matches is taken.
        `action` as for FaultServer.add_fault: `status` (4xx, 5xx; `headers` may hold a
        Retry-After), `drop_before` (the request never reaches the server), `drop_after_store`
        (it is applied and its answer lost), `garbage`, `content_type` or `huge` (an answer
        the client cannot read; nothing applied)."""
        fault = Fault(method, path, times, action)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def _through(self, method: str, path: str, apply: Callable[[], Any]) -> Any:
        """`apply()` (the request reaching the server) unless a fault takes the request."""
        fault = next((f for f in self.faults if f.takes(method, path)), None)
        if fault is None:
            return apply()
        fault.hits += 1
        if fault.action.get("drop_before"):
            raise _broken(method, path)
        if fault.action.get("drop_after_store"):
            with contextlib.suppress(RemoteError):  # whatever it answered is lost
                apply()
            raise _broken(method, path)
        return fault_answer(fault.action, method, path)

    # ---- errors as remote.Remote raises them ------------------------------------------------
    @staticmethod
    def _refused(exc: HTTPError, method: str, path: str) -> NoReturn:
        if exc.status == 404:
            raise Gone(f"{method} {path}: not found on the server (404)")
        message = _server_message(json.dumps({"error": exc.message}).encode())
        raise Permanent(f"{method} {path}: refused by the server ({exc.status}){message}")

    @staticmethod
    def _job(obj: dict[str, Any]) -> ServerJob:
        return parse_server_job(obj)

    def _call(self, method: str, path: str, action: Callable[[], dict[str, Any]]) -> ServerJob:
        def request() -> ServerJob:
            try:
                obj = action()
            except HTTPError as exc:
                self._refused(exc, method, path)
            return self._job(obj)

        answer: ServerJob = self._through(method, path, request)
        return answer

    @staticmethod
    def _audio(path: str) -> dict[str, Any]:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise Permanent(f"cannot read the job's audio copy {path}: {exc.strerror}") from None
        return {
            "filename": sanitise_filename(os.path.basename(path)),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    # ---- the RemoteAPI ----------------------------------------------------------------------
    def create(
        self,
        local_id: str,
        text: str,
        metadata: dict[str, Any],
        audio_path: str | None,
        upload: tuple[str, str] | None = None,
    ) -> ServerJob:
        if upload is not None:
            raise Permanent("POST /jobs: refused by the server (422): no uploads in memory")
        audio = self._audio(audio_path) if audio_path is not None else None
        # A JSON body and a multipart form carry the same values here (metadata as JSON).
        metadata = json.loads(json.dumps(metadata))
        return self._call(
            "POST", "/jobs", lambda: self.server.create(local_id, text, metadata, audio)[0]
        )

    def update(
        self,
        server_id: str,
        fields: dict[str, Any],
        audio_path: str | None,
        upload: tuple[str, str] | None = None,
    ) -> ServerJob:
        path = "/jobs/" + server_id
        if upload is not None:
            raise Permanent(f"PATCH {path}: refused by the server (422): no uploads in memory")
        audio = self._audio(audio_path) if audio_path is not None else None
        fields = json.loads(json.dumps(fields))
        return self._call("PATCH", path, lambda: self.server.update(server_id, fields, audio))

    def delete(self, server_id: str) -> None:
        path = "/jobs/" + server_id

        def request() -> None:
            try:
                self.server.delete(server_id)
            except HTTPError as exc:
                if exc.status != 404:  # 404 counts as done
                    self._refused(exc, "DELETE", path)

        self._through("DELETE", path, request)

    def get(self, server_id: str) -> ServerJob:
        return self._call("GET", "/jobs/" + server_id, lambda: self.server.get(server_id))

    def list_pages(
        self, etag: str | None
    ) -> Iterator[tuple[list[ServerJob | InvalidJob], str | None]]:
        limit = min(self.page_limit or DEFAULT_LIMIT, MAX_LIMIT)
        listing_etag: str | None = None
        after = 0
        while True:
            first = listing_etag is None
            page = functools.partial(self._page, etag if first else None, after, limit)
            objects, last, page_etag = self._through("GET", "/jobs", page)
            if first:
                listing_etag = page_etag  # the first page's ETag names the listing
            yield [self._item(obj) for obj in objects], listing_etag
            if last is None:
                return
            after = last

    def _page(
        self, etag: str | None, after: int, limit: int
    ) -> tuple[list[dict[str, Any]], int | None, str]:
        """One GET of the listing: (its jobs, the seq to go on after, its ETag)."""
        if etag is not None and etag == self.server.etag:
            raise NotModified()
        objects, last = self.server.list_page(after, limit)
        return objects, last, self.server.etag

    def _item(self, obj: dict[str, Any]) -> ServerJob | InvalidJob:
        try:
            return self._job(obj)
        except InvalidJobObject as exc:
            return _invalid_job(obj, exc)

    def changes(
        self, since: str | None, limit: int, wait: float = 0, held: HeldTest | None = None
    ) -> FeedPage:
        if not self.server.offers_feed:
            raise FeedNotOffered()
        try:
            seq = None if since is None else self.server.read_checkpoint(since)
            objects, next_seq, more = self.server.changes(seq, min(limit, MAX_LIMIT))
        except _Diverged:
            raise FeedGone("diverged") from None
        items: list[Any] = [
            Tombstone(obj["id"], obj["local_id"])
            if obj.get("deleted")
            else (held is not None and unchanged_item(obj, held)) or self._item(obj)
            for obj in objects
        ]
        return FeedPage(items, self.server.make_checkpoint(next_seq), more)

    def batch(self, operations: list[tuple[str, bytes]]) -> list[Any]:
        return list(self.batch_answers(operations, self.batch_results(operations)))

    def batch_results(self, operations: list[tuple[str, bytes]]) -> list[Any]:
        """Each operation (its kind, its JSON as the pass encoded it) applied in turn."""
        if not self.server.offers_batch:
            raise BatchNotOffered()
        if len(operations) > MAX_BATCH_OPERATIONS:
            raise Permanent(f"POST /batch: more than {MAX_BATCH_OPERATIONS} operations")
        return [self._batch_result(json.loads(encoded)) for _, encoded in operations]

    def batch_answers(
        self, operations: list[tuple[str, bytes]], results: list[Any]
    ) -> Iterator[Any]:
        for (kind, _), result in zip(operations, results, strict=True):
            yield _batch_answer(kind, result, self._job)

    def _batch_result(self, op: dict[str, Any]) -> dict[str, Any]:
        """One operation applied as the reference server's batch applies it: its own status."""
        try:
            kind = op.get("op")
            if kind == "create":
                job, created = self.server.create(
                    op.get("local_id"), op.get("text"), op.get("metadata", {})
                )
                return {"status": 201 if created else 200, "job": job, "error": None}
            if kind == "update":
                changes = op.get("fields")
                if not isinstance(changes, dict):
                    raise HTTPError(422, "fields must be a JSON object")
                if changes.get("audio", None) is not None:
                    raise HTTPError(422, "audio must be null (to remove the audio), or left out")
                return {"status": 200, "job": self.server.update(op["id"], changes), "error": None}
            if kind == "delete":
                self.server.delete(op["id"])
                return {"status": 204, "job": None, "error": None}
            raise HTTPError(422, 'op must be "create", "update" or "delete"')
        except HTTPError as exc:
            error = "no such job" if exc.status == 404 else exc.message
            return {"status": exc.status, "job": None, "error": error}

    def uploader(
        self, chunk_bytes: int, progress: Callable[[int, int], None] | None = None
    ) -> Uploader | None:
        return None

    def close(self) -> None:
        self.closed = True
