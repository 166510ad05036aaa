"""The daemon's live long-poll on the change feed (contract section 5 and 6.7).

While no pass runs, one `GET /changes?since=CHECKPOINT&wait=60` stays open; when the server
answers with a change, the daemon is asked for a pass at once (the pass reads and applies the
changes from its stored checkpoint; the poll itself applies nothing). Any failure falls back to
the interval passes and tries again with the job backoff (base `backoff_base_seconds`, at least
1 s, at most `interval_seconds`); a 429/503 records its Retry-After window like every request.
A server that answers at once without a change is not polled in a busy loop.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from . import log
from .api import FeedGone, FeedNotOffered
from .state import read_backoff_until, read_pull_state, write_backoff_until

LONG_POLL_WAIT = 60.0  # seconds the server may hold the request (its maximum)
MIN_POLL_SPACING = 1.0  # an answer without a change sooner than this counts as a failure


class LivePoller:
    """One thread holding the long-poll. `request_pass` is called (from the thread) when the
    server has a change; `pass_running` says whether a pass runs now (no poll is started then)."""

    def __init__(
        self,
        make_remote: Callable[[], Any],
        data_dir: str,
        api_base: str,
        request_pass: Callable[[], None],
        pass_running: Callable[[], bool],
        backoff_base: float,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.make_remote = make_remote
        self.data_dir = data_dir
        self.api_base = api_base
        self.request_pass = request_pass
        self.pass_running = pass_running
        self.backoff_base = max(backoff_base, 1.0)
        self.interval = interval
        self.clock = clock
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # a pass ended: look at the checkpoint again
        self.failures = 0
        self.open = False  # a long-poll is in flight (for `status`)
        self.thread = threading.Thread(target=self._run, name="jobsyncd-live", daemon=True)
        self.remote: Any = None
        self.rng = random.Random()
        self.woke_at: str | None = None  # the checkpoint whose poll last asked for a pass
        self.failure_logged = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        remote = self.remote
        if remote is not None:
            try:
                remote.close()
            except Exception:  # noqa: BLE001 - closing a session from another thread: best effort
                pass

    def pass_finished(self) -> None:
        self.wake.set()

    # ---- the thread ----------------------------------------------------------------------------
    def _checkpoint(self) -> tuple[bool, str | None]:
        """(the feed is offered as far as we know, the stored checkpoint)."""
        state = read_pull_state(self.data_dir)
        if state.get("server") != self.api_base:
            return False, None
        feed = state.get("feed")
        offered = isinstance(feed, dict) and feed.get("offered") is True
        checkpoint = state.get("checkpoint")
        return offered, checkpoint if isinstance(checkpoint, str) else None

    def _sleep(self, seconds: float) -> None:
        self.wake.wait(max(0.0, seconds))
        self.wake.clear()

    def _moved_past(self, checkpoint: str) -> bool:
        """Whether a pass that ran while the poll was open has moved the stored checkpoint on
        from the one polled: the change that answered the poll is then most likely applied
        already (the daemon's own pushes come back on the feed), so no second pass is run for
        it. A pass still running is waited for first (bounded by the stop event)."""
        while self.pass_running() and not self.stop_event.is_set():
            self._sleep(self.interval)  # pass_finished() wakes it
        return self._checkpoint()[1] not in (None, checkpoint)

    def _retry_delay(self) -> float:
        nominal = min(self.backoff_base * 2.0 ** min(self.failures - 1, 30), self.interval)
        return nominal / 2 + self.rng.random() * nominal / 2

    def _run(self) -> None:
        while not self.stop_event.is_set():
            offered, checkpoint = self._checkpoint()
            until = read_backoff_until(self.data_dir)
            if until is not None and until > time.time():
                self._sleep(until - time.time())
                continue
            if not offered or checkpoint is None or self.pass_running():
                self._sleep(self.interval)  # a pass records the feed and its checkpoint first
                continue
            if checkpoint == self.woke_at:
                # The pass it asked for did not move the checkpoint (it failed): no tight loop.
                self.failures += 1
                self.woke_at = None
                self._sleep(self._retry_delay())
                continue
            self._poll_once(checkpoint)

    def _poll_once(self, checkpoint: str) -> None:
        from .api import BackOff, RemoteError

        if self.remote is None:
            self.remote = self.make_remote()
        started = self.clock()
        self.open = True
        try:
            page = self.remote.changes(checkpoint, 1, LONG_POLL_WAIT)
        except BackOff as exc:
            write_backoff_until(self.data_dir, time.time() + exc.retry_after)
            self.failures += 1
            return
        except (RemoteError, FeedNotOffered, FeedGone) as exc:
            if self.stop_event.is_set():
                return
            self.failures += 1
            if isinstance(exc, FeedGone):
                self.request_pass()  # the pass resyncs; the poll waits for its checkpoint
                self._sleep(self.interval)
                return
            delay = self._retry_delay()
            if not self.failure_logged:
                log.info(f"the live long-poll failed ({exc}); interval passes until it is back")
                self.failure_logged = True
            self._sleep(delay)
            return
        finally:
            self.open = False
        if page.items:
            if self.failure_logged:
                log.info("the live long-poll is back")
                self.failure_logged = False
            self.failures = 0
            if self._moved_past(checkpoint):
                return  # poll again from the new checkpoint: a later change answers at once
            self.woke_at = checkpoint
            self.request_pass()
            self._sleep(self.interval)  # woken when the pass ends, with a new checkpoint
            return
        if self.clock() - started < MIN_POLL_SPACING:
            self.failures += 1  # answered at once without a change: no busy loop
            self._sleep(self._retry_delay())
        else:
            self.failures = 0
