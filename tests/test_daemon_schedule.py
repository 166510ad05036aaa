"""The daemon's pass schedule (daemon.PassSchedule) under clock steps, with a fake clock: the
schedule package counts in wall time, so a clock set back a day would hold every pass for a day.
After a step back or forward a pass still runs every interval, neither stalling nor flooding.
"""

from __future__ import annotations

import datetime as _dt
import types

import pytest
import schedule

from jobsyncd.daemon import PassSchedule

INTERVAL = 60


class FakeClock:
    """Wall time (naive local, as schedule reads it) and monotonic time that only move when
    told; the wall clock can step."""

    def __init__(self) -> None:
        self.wall = _dt.datetime(2026, 11, 30, 12, 0, 0)
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += _dt.timedelta(seconds=seconds)
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.wall += _dt.timedelta(seconds=seconds)

    def now(self) -> _dt.datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()

    class FakeDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN206 - as datetime.now
            return fake.wall if tz is None else fake.wall.astimezone(tz)

    module = types.SimpleNamespace(
        **{name: getattr(_dt, name) for name in dir(_dt) if not name.startswith("__")}
    )
    module.datetime = FakeDatetime
    monkeypatch.setattr(schedule, "datetime", module)  # the wall clock schedule reads
    return fake


def passes_in(clock: FakeClock, plan: PassSchedule, runs: list[float], seconds: int) -> int:
    """Run the daemon's checks once a second for `seconds`; how many passes came due."""
    before = len(runs)
    for _ in range(seconds):
        clock.advance(1)
        plan.run_pending()
    return len(runs) - before


def make_plan(clock: FakeClock) -> tuple[PassSchedule, list[float]]:
    runs: list[float] = []
    plan = PassSchedule(lambda: runs.append(clock.mono), wall=clock.now, monotonic=clock.monotonic)
    plan.every(INTERVAL)
    return plan, runs


def test_passes_come_every_interval_on_a_steady_clock(clock):
    plan, runs = make_plan(clock)
    assert passes_in(clock, plan, runs, 10 * INTERVAL) == 10


def test_after_the_clock_is_set_back_a_day_a_pass_still_runs_every_interval(clock):
    plan, runs = make_plan(clock)
    passes_in(clock, plan, runs, 3 * INTERVAL)
    clock.step(-86_400)
    assert passes_in(clock, plan, runs, 10 * INTERVAL) >= 9
    gaps = [b - a for a, b in zip(runs[:-1], runs[1:], strict=True)]
    assert max(gaps) <= 2 * INTERVAL, gaps


def test_after_the_clock_jumps_a_day_forward_passes_keep_their_interval_without_a_flood(clock):
    plan, runs = make_plan(clock)
    passes_in(clock, plan, runs, 3 * INTERVAL)
    clock.step(86_400)
    assert 9 <= passes_in(clock, plan, runs, 10 * INTERVAL) <= 11
    gaps = [b - a for a, b in zip(runs[:-1], runs[1:], strict=True)]
    assert min(gaps) >= INTERVAL / 2 and max(gaps) <= 2 * INTERVAL, gaps


def test_idle_seconds_stays_within_an_interval_after_a_step_back(clock):
    plan, runs = make_plan(clock)
    clock.step(-86_400)
    plan.run_pending()
    assert plan.idle_seconds is not None and plan.idle_seconds <= INTERVAL
