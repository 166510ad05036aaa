"""One sync pass (contract section 6): push each due job, pull the server's changes, notice
jobs deleted on the server.

`run_pass(store, remote, policy)` knows no Click, no config file and no HTTP details: it sorts
the remote's error kinds (api.py). The package, by layer:

- run.py: run_pass, which puts a pass together (loaded on first use).
- rules.py: Policy, PassSummary, StopPass, and what is decided from one job alone (is it due,
  which fields a PATCH carries); pure, shared with `sync --dry-run`.
- outcomes.py: what the pass learned about a job, as immutable records, and the one pure
  `apply` that turns one into the job's new record.
- journal.py: writing outcomes in few fsynced batches under the store lock, create_sent
  marks, audio removal, the server ids bound in this pass.
- push.py: each due job sent (single requests, batches, resumable uploads).
- pull.py: the change feed or the listing, matching, rebinds, deletions on the server, the
  deletion guard.

The pass never holds the store lock during network I/O. Deletion is decided against what the
last sync recorded (vdirsyncer's rule): only a job `synced` when the pass began, absent from a
complete listing and confirmed 404 by a GET (or named by a tombstone) is removed; removing every
such job trips the deletion guard (vdirsyncer's StorageEmpty) unless forced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .rules import (
    PassSummary,
    Policy,
    StopPass,
    changed_fields,
    differs,
    is_due,
    longest_backoff,
    stop_for,
)

if TYPE_CHECKING:
    from .run import count_due, prepare_pass, run_pass

__all__ = [
    "PassSummary",
    "Policy",
    "StopPass",
    "changed_fields",
    "count_due",
    "differs",
    "is_due",
    "longest_backoff",
    "prepare_pass",
    "run_pass",
    "stop_for",
]


def __getattr__(name: str) -> Any:
    # The pass itself (push, pull, journal, outcomes: 15 ms of imports) loads on first use: a
    # `sync` that hands over to a daemon, and every module that only needs Policy or
    # PassSummary, never pays for it.
    if name in ("run_pass", "prepare_pass", "count_due"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
