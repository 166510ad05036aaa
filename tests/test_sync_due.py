"""Which jobs a pass pushes (sync.rules.is_due): pure logic, no I/O."""

from __future__ import annotations

import datetime as dt

import pytest

from jobsyncd.model import Job, rfc3339
from jobsyncd.sync.rules import is_due as _is_due

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)
PAST = rfc3339(NOW - dt.timedelta(seconds=5))
FUTURE = rfc3339(NOW + dt.timedelta(seconds=5))


@pytest.mark.parametrize("next_attempt_at", [None, PAST, FUTURE])
def test_a_pending_job_is_always_due_whatever_an_old_backoff_says(next_attempt_at):
    assert _is_due(Job("a", sync_status="pending", next_attempt_at=next_attempt_at), NOW)


@pytest.mark.parametrize("status", ["error", "pending_deletion"])
def test_an_errored_job_or_deletion_waits_for_its_backoff(status):
    assert _is_due(Job("a", sync_status=status, next_attempt_at=PAST), NOW)
    assert not _is_due(Job("a", sync_status=status, next_attempt_at=FUTURE), NOW)


@pytest.mark.parametrize("status", ["synced", "failed"])
def test_synced_and_failed_jobs_are_never_pushed(status):
    assert not _is_due(Job("a", sync_status=status), NOW)
