"""User-facing failures: each kind carries the contract's exit code (section 2).

The CLI turns any of these into one `jobsyncd: error:` line and its exit code, in one place.
"""

from __future__ import annotations


class JobsyncdError(Exception):
    """The operation failed (exit 1)."""

    exit_code = 1


class UsageProblem(JobsyncdError):
    """Bad input on the command line (exit 2, as Click's own usage errors)."""

    exit_code = 2


class TryLater(JobsyncdError):
    """Server unreachable, asked to back off, or the daemon lock is held (exit 75)."""

    exit_code = 75


class CredentialsRefused(JobsyncdError):
    """The server refused the credentials (exit 77)."""

    exit_code = 77


class ConfigError(JobsyncdError):
    """Unreadable or invalid configuration (exit 78)."""

    exit_code = 78


class NoSuchJob(JobsyncdError):
    pass


class SymlinkRefused(JobsyncdError):
    """A symlink was planted where jobsyncd writes; we refuse to write through it."""

    def __init__(self, path: str) -> None:
        super().__init__(f"refusing to follow the symlink at {path}")
        self.path = path
