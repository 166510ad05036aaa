"""The two kinds of failure the reference server knows: a setting it refuses to start with, and
an error answer to one request (status, message, extra headers)."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A setting (token file, size limit, database URL) that the server refuses to start with."""


class HTTPError(Exception):
    """An error answer: `{"error": message}` with `status` and `headers`."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: Iterable[tuple[str, str]] = (),
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)
        self.extra = extra or {}  # more members of the error object, e.g. the 410's `reason`
