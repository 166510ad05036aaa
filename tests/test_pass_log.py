"""What the daemon logs about its passes (contract section 5), with a fake clock: passes that
changed something or failed, offline and back-off when they begin and end, idle passes only with
-v or as one line an hour."""

from __future__ import annotations

import pytest

from jobsyncd import log
from jobsyncd.runner import PassLog, describe
from jobsyncd.sync import PassSummary


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged(capsys):
    log.configure(verbose=0, daemon=True)
    log.timestamps = False  # compared as text below
    yield lambda: [line for line in capsys.readouterr().err.splitlines() if line]
    log.configure()


def feed(plog: PassLog, clock: Clock, *summaries: PassSummary, every: float = 15.0) -> None:
    for summary in summaries:
        clock.now += every
        plog.report(summary, describe(summary))


IDLE = PassSummary()
OFFLINE = PassSummary(ok=False, skipped="offline", message="cannot reach http://x: refused")
BACKOFF = PassSummary(ok=False, skipped="backoff", message="the server asked to back off")


def test_an_idle_pass_is_not_logged_but_one_that_changed_something_is(logged):
    clock = Clock()
    plog = PassLog(clock=clock)
    feed(plog, clock, IDLE, IDLE, PassSummary(created=1), IDLE, PassSummary(pulled=2))
    lines = logged()
    assert len(lines) == 2
    assert "1 created" in lines[0] and "2 pulled" in lines[1]


def test_a_pass_that_failed_is_logged_even_with_no_counts(logged):
    clock = Clock()
    plog = PassLog(clock=clock)
    feed(plog, clock, PassSummary(ok=False, message="the listing failed part-way"))
    lines = logged()
    assert any("warning: the listing failed" in ln for ln in lines)
    assert any("pass not ok" in ln for ln in lines)


def test_with_verbose_every_pass_is_logged(logged):
    clock = Clock()
    plog = PassLog(verbose=1, clock=clock)
    feed(plog, clock, IDLE, IDLE, IDLE)
    assert len(logged()) == 3


def test_idle_passes_give_one_line_an_hour_counting_them(logged):
    clock = Clock()
    plog = PassLog(clock=clock)
    feed(plog, clock, *[IDLE] * 240)  # an hour at 15 s
    lines = logged()
    assert lines == ["jobsyncd: 240 idle passes in the last hour"]
    feed(plog, clock, *[IDLE] * (24 * 240 - 240))  # the rest of the day
    assert len(logged()) == 23


def test_offline_is_logged_when_it_begins_and_when_it_ends_not_at_every_pass(logged):
    clock = Clock()
    plog = PassLog(clock=clock)
    feed(plog, clock, *[OFFLINE] * 100)
    lines = logged()
    assert len(lines) == 2  # the reason, and the skipped pass
    assert "cannot reach" in lines[0] and "skipped (offline)" in lines[1]
    feed(plog, clock, IDLE)
    assert logged() == ["jobsyncd: the server is no longer unreachable"]


def test_back_off_after_offline_is_a_new_state_logged_once(logged):
    clock = Clock()
    plog = PassLog(clock=clock)
    feed(plog, clock, OFFLINE, OFFLINE, BACKOFF, BACKOFF, PassSummary(created=1))
    lines = logged()
    assert sum("skipped (offline)" in ln for ln in lines) == 1
    assert sum("skipped (backoff)" in ln for ln in lines) == 1
    assert "no longer asking to back off" in lines[-2] and "1 created" in lines[-1]
