"""What the reference server accepts as a job's values (contract section 7).

It stores nothing a strict client cannot read back: no lone surrogate in any string (keys
included), numbers that are finite doubles, metadata nested at most 32 levels (the metadata object
itself is level 1) and at most 1 MiB as JSON. Anything else is 422 and nothing is stored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from jobsyncd.server.errors import HTTPError

MAX_METADATA_DEPTH = 32
MAX_METADATA_BYTES = 1 << 20
MAX_STATUS_CHARS = 100

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# A lone surrogate is the only thing a Python str can hold that UTF-8 (and so strict JSON) cannot.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")

POST_FIELDS = ("local_id", "text", "metadata")
PATCH_FIELDS = ("text", "metadata", "status")
# A JSON request of its own (not an operation of a batch) may also attach a finished resumable
# upload, and a JSON PATCH remove the audio with "audio": null.
UPLOAD_FIELDS = ("audio_upload", "audio_filename")
JSON_POST_FIELDS = (*POST_FIELDS, *UPLOAD_FIELDS)
JSON_PATCH_FIELDS = (*PATCH_FIELDS, "audio", *UPLOAD_FIELDS)
BATCH_PATCH_FIELDS = (*PATCH_FIELDS, "audio")  # an upload is attached by a request of its own


class Invalid(ValueError):
    """A value that parses as JSON but is not one the server stores."""


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def loads(text: str | bytes, strict_numbers: bool = True) -> Any:
    """Strict JSON (RFC 8259): no NaN/Infinity literals; a number too large for a double, such as
    1e999 (which Python reads as infinity), raises Invalid (unless strict_numbers is False)."""

    def parse_float(literal: str) -> float:
        value = float(literal)
        if strict_numbers and not math.isfinite(value):
            raise Invalid(f"the number {literal[:40]} is not a finite double")
        return value

    return json.loads(text, parse_constant=_refuse_constant, parse_float=parse_float)


def has_lone_surrogate(text: str) -> bool:
    return _SURROGATE_RE.search(text) is not None


def check_value(value: Any, depth: int, where: str) -> None:
    """Raise Invalid for what a strict client could not read: `depth` is the level of `value`'s
    container (the metadata object is level 1)."""
    if isinstance(value, str):
        if has_lone_surrogate(value):
            raise Invalid(f"{where} holds a lone surrogate (not valid Unicode)")
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise Invalid(f"{where} holds a number that is not a finite double") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid(f"{where} holds a number that is not a finite double")
    elif isinstance(value, (dict, list)):
        if depth > MAX_METADATA_DEPTH:
            raise Invalid(f"{where} nests deeper than {MAX_METADATA_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and has_lone_surrogate(key):
                raise Invalid(f"{where} has a key with a lone surrogate (not valid Unicode)")
            check_value(item, depth + 1, where)
    else:
        raise Invalid(f"{where} holds a value that is not JSON")


def check_local_id(value: Any) -> str:
    if value is None:
        raise HTTPError(422, "local_id is required")
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise HTTPError(422, "local_id must be a UUID")
    return value.lower()


def check_text(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise HTTPError(422, "text must be a string or null")
    if value is not None and has_lone_surrogate(value):
        raise HTTPError(422, "text is not valid Unicode (a lone surrogate)")
    return value


def check_metadata(value: Any) -> dict[str, Any]:
    stored_metadata(value)
    checked: dict[str, Any] = value
    return checked


def _never(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps(value, separators=(",", ":")) without a new encoder for every call: a batch
# encodes 500 metadata objects. No circular check: a parsed JSON value has no cycle.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_compact_chunks = (
    _c_make_encoder(
        None, _never, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    if _c_make_encoder is not None
    else None
)


def _compact_ascii(value: Any) -> str:
    if _compact_chunks is None:
        return json.dumps(value, separators=(",", ":"))
    return "".join(_compact_chunks(value, 0))


def stored_metadata(value: Any) -> str:
    """Check metadata as check_metadata does; returns its JSON as the storage keeps it (compact,
    ASCII), so that a batch encodes each operation's metadata once."""
    if not isinstance(value, dict):
        raise HTTPError(422, "metadata must be a JSON object")
    try:
        check_value(value, 1, "metadata")
        stored = _compact_ascii(value)
        # The limit is on the UTF-8 JSON, never longer than this ASCII form with its escapes.
        if len(stored) > MAX_METADATA_BYTES:
            size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
            if size > MAX_METADATA_BYTES:
                raise HTTPError(422, f"metadata larger than {MAX_METADATA_BYTES} bytes as JSON")
    except Invalid as e:
        raise HTTPError(422, str(e)) from None
    except (ValueError, RecursionError):
        raise HTTPError(422, "metadata cannot be stored") from None
    return stored


def check_status(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_STATUS_CHARS:
        raise HTTPError(422, f"status must be a string of 1 to {MAX_STATUS_CHARS} characters")
    if has_lone_surrogate(value):
        raise HTTPError(422, "status is not valid Unicode (a lone surrogate)")
    return value


def metadata_field(text: str) -> dict[str, Any]:
    """The `metadata` field of a multipart body: a JSON object as a JSON string."""
    try:
        value = loads(text)
    except Invalid as e:
        raise HTTPError(422, str(e)) from None
    except (ValueError, RecursionError):
        raise HTTPError(422, "metadata must be a JSON object (as a JSON string)") from None
    return check_metadata(value)


def check_fields(document: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        raise HTTPError(
            422, f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
