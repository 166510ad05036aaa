"""daemon.pass_making_progress: what counts as progress for the systemd watchdog (contract 5),
with real remote.RequestInFlight records and made-up monotonic times."""

from __future__ import annotations

from jobsyncd.daemon import pass_making_progress
from jobsyncd.remote import RequestInFlight

PERIOD = 10.0


def request(sent_at: float | None, limit: float = 30.0) -> RequestInFlight:
    flight = RequestInFlight(limit)
    if sent_at is not None:
        flight.deadline = sent_at + limit
    return flight


def test_a_request_within_its_whole_answer_limit_is_progress_however_long_since_the_last_job():
    assert pass_making_progress(125.0, 0.0, PERIOD, [request(sent_at=100.0)])


def test_a_request_past_its_whole_answer_limit_is_not_progress():
    assert not pass_making_progress(131.0, 130.5, PERIOD, [request(sent_at=100.0)])


def test_a_request_still_being_sent_is_progress():
    assert pass_making_progress(500.0, 0.0, PERIOD, [request(sent_at=None)])


def test_no_request_and_nothing_done_for_a_watchdog_period_is_not_progress():
    assert not pass_making_progress(111.0, 100.0, PERIOD, [])


def test_no_request_and_a_job_done_within_the_period_is_progress():
    assert pass_making_progress(105.0, 100.0, PERIOD, [])
