"""daemon.PassWorker: one pass at a time in a thread, its result handed to the loop through the
self-pipe, with a real store in a private data dir and passes made up in the test."""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import poll

from jobsyncd.daemon import PassWorker
from jobsyncd.jobs import create_job, delete_job
from jobsyncd.store import Store, prepare_data_dir
from jobsyncd.sync import PassSummary


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    old = os.umask(0o022)
    try:
        return Store(prepare_data_dir(str(tmp_path / "data")))
    finally:
        os.umask(old)


def woken(fd: int) -> bytes:
    assert select.select([fd], [], [], 10.0)[0], "the worker did not wake the loop"
    return os.read(fd, 16)


def test_a_pass_that_ends_wakes_the_loop_and_hands_over_its_summary(store, pipe):
    worker = PassWorker(store, pipe[1], lambda: False)
    summary = PassSummary(created=2)
    assert not worker.running and not worker.ended()
    worker.start(lambda should_stop: summary)
    assert worker.running
    assert woken(pipe[0]) == b"p"
    poll(worker.ended, what="the worker ended")
    result, counts = worker.finish()
    assert result is summary
    assert counts is None  # the pass did not fold the store
    assert not worker.running and not worker.stuck()


def test_what_a_pass_raises_is_its_result_and_never_escapes_the_thread(store, pipe):
    worker = PassWorker(store, pipe[1], lambda: False)

    def run(should_stop: Callable[[], bool]) -> PassSummary:
        raise RuntimeError("boom")

    worker.start(run)
    woken(pipe[0])
    poll(worker.ended, what="the worker ended")
    result, _ = worker.finish()
    assert isinstance(result, RuntimeError) and str(result) == "boom"


def test_a_pass_that_folded_the_store_reports_jobs_per_status_and_leaves_it_unloaded(store, pipe):
    create_job(store, "a", None, {})
    delete_job(store, create_job(store, "b", None, {}).local_id)
    worker = PassWorker(store, pipe[1], lambda: False)

    def run(should_stop: Callable[[], bool]) -> PassSummary:
        store.load()
        return PassSummary()

    worker.start(run)
    woken(pipe[0])
    poll(worker.ended, what="the worker ended")
    _, counts = worker.finish()
    assert counts == {"pending": 1, "pending_deletion": 1}
    assert not store.loaded  # the daemon holds no job records between passes


def test_a_pass_sees_the_stop_request_and_each_question_is_a_heartbeat(store, pipe):
    stop = threading.Event()
    asked = threading.Event()
    go_on = threading.Event()
    worker = PassWorker(store, pipe[1], stop.is_set)
    answers: list[bool] = []

    def run(should_stop: Callable[[], bool]) -> PassSummary:
        answers.append(should_stop())
        asked.set()
        go_on.wait(10)
        answers.append(should_stop())
        return PassSummary()

    worker.start(run)
    assert asked.wait(10)
    first_beat = worker.heartbeat
    stop.set()
    go_on.set()
    woken(pipe[0])
    poll(worker.ended, what="the worker ended")
    worker.finish()
    assert answers == [False, True]
    assert worker.heartbeat >= first_beat


def test_a_pass_still_running_after_the_grace_period_is_reported_stuck(store, pipe):
    release = threading.Event()
    worker = PassWorker(store, pipe[1], lambda: False)
    worker.start(lambda should_stop: (release.wait(10), PassSummary())[1])
    try:
        assert worker.abandon(0.05)
        assert worker.stuck()
        assert not worker.ended()
    finally:
        release.set()
    woken(pipe[0])
    poll(worker.ended, what="the worker ended")
    worker.finish()
    assert not worker.abandon(0.05)
