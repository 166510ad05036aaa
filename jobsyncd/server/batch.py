"""POST /api/v1/batch (contract section 7, 6.3): up to 500 operations in one request, each
checked as its own request would be and answered in its own result, applied in one transaction.

CouchDB's `_bulk_docs` is the model: one result per operation, in order; one failing (404, 413,
422) never undoes another.
"""

from __future__ import annotations

import json
from typing import Any

from jobsyncd.server import validation
from jobsyncd.server.body import MAX_JSON_BYTES
from jobsyncd.server.errors import HTTPError

MAX_OPERATIONS = 500
MAX_BATCH_BYTES = 8 << 20

# ("create", local_id, text, metadata JSON as stored) | ("update", id, changes (metadata as
# stored JSON)) | ("delete", id)
Checked = tuple[Any, ...]


_CREATE_KEYS = frozenset(("op", *validation.POST_FIELDS))


def check_document(document: dict[str, Any]) -> list[Any]:
    validation.check_fields(document, ("operations",))
    operations = document.get("operations")
    if not isinstance(operations, list):
        raise HTTPError(422, "operations must be a list")
    if len(operations) > MAX_OPERATIONS:
        raise HTTPError(413, f"more than {MAX_OPERATIONS} operations in one batch")
    return operations


def check_operation(operation: Any, may_be_large: bool = True) -> Checked:
    """The operation as the storage applies it; HTTPError (413/422) as its own request would get.
    `may_be_large` False (the whole batch is under 1 MiB) skips measuring it."""
    if not isinstance(operation, dict):
        raise HTTPError(422, "an operation must be a JSON object")
    if may_be_large:
        try:
            size = len(json.dumps(operation, ensure_ascii=False, separators=(",", ":")).encode())
        except (ValueError, UnicodeEncodeError):
            size = 0  # what cannot be encoded is refused below, as invalid
        if size > MAX_JSON_BYTES:
            raise HTTPError(413, f"operation larger than {MAX_JSON_BYTES} bytes")
    kind = operation.get("op")
    if kind == "create":
        if not operation.keys() <= _CREATE_KEYS:  # the usual create passes without a copy
            fields = {k: v for k, v in operation.items() if k != "op"}
            validation.check_fields(fields, validation.POST_FIELDS)
        fields = operation
        return (
            "create",
            validation.check_local_id(fields.get("local_id")),
            validation.check_text(fields.get("text")),
            validation.stored_metadata(fields.get("metadata", {})),
        )
    if kind == "update":
        validation.check_fields(operation, ("op", "id", "fields"))
        changes = operation.get("fields")
        if not isinstance(changes, dict):
            raise HTTPError(422, "fields must be a JSON object")
        validation.check_fields(changes, validation.BATCH_PATCH_FIELDS)
        checked: dict[str, Any] = {}
        if "audio" in changes:
            if changes["audio"] is not None:
                raise HTTPError(422, "audio must be null (to remove the audio), or left out")
            checked["audio"] = None
        if "text" in changes:
            checked["text"] = validation.check_text(changes["text"])
        if "metadata" in changes:
            checked["metadata"] = validation.stored_metadata(changes["metadata"])
        if "status" in changes:
            checked["status"] = validation.check_status(changes["status"])
        return ("update", _job_id(operation), checked)
    if kind == "delete":
        validation.check_fields(operation, ("op", "id"))
        return ("delete", _job_id(operation))
    raise HTTPError(422, 'op must be "create", "update" or "delete"')


def _job_id(operation: dict[str, Any]) -> str:
    job_id = operation.get("id")
    if not isinstance(job_id, str) or not job_id:
        raise HTTPError(422, "id must be a job's server id")
    return job_id


def result(status: int, job: str | None = None, error: str | None = None) -> str:
    return (
        f'{{"status":{status},"job":{job or "null"},'
        f'"error":{json.dumps(error) if error else "null"}}}'
    )
