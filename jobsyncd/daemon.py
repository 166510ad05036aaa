"""`jobsyncd daemon`: the lock, the schedule loop, signals, wake-ups and the notify protocol.

The main loop sleeps in select() on the wake-up socket and a self-pipe that signal handlers
write to (signal.set_wakeup_fd); handlers only set flags. Passes run in a `PassWorker` thread
so that SIGTERM can abandon one stuck in a request (the idempotent create makes that safe) and
the loop stays free to answer wake-ups, reloads and the watchdog. Never forks or detaches.
Takes a `Runtime` (settings, store, verbosity, reload); imports nothing of the CLI.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import schedule

from . import log
from .config import Settings, check_server_url, read_token
from .errors import ConfigError, JobsyncdError, SymlinkRefused, TryLater
from .fsutil import FileLock, write_file_atomically
from .notify import Notifier
from .runner import PassLog, describe, execute_pass, sync_lock
from .state import read_backoff_until
from .store import Store
from .sync import PassSummary
from .wakeup import (
    DAEMON_LOCK_NAME,
    DAEMON_PID_NAME,
    SOCKET_NAME,
    WAIT_PREFIX,
    reply_socket_path,
    send_reply,
)

if TYPE_CHECKING:
    from .runtime import Runtime

STOP_GRACE_SECONDS = 3.0


CLOCK_STEP_SECONDS = 2.0  # wall and monotonic time drifting apart by more: the clock stepped


class PassSchedule:
    """A pass every `interval` seconds with the schedule package, which counts in local wall
    time: a clock set back a day (or a DST change) would hold every pass for that long, one set
    forward would run a pass at once. Each check compares wall time with the monotonic clock
    and, when they moved apart by more than CLOCK_STEP_SECONDS, starts the interval again from
    now: passes neither stall nor flood. The clocks are injectable for tests."""

    def __init__(
        self,
        on_due: Callable[[], None],
        wall: Callable[[], _dt.datetime] = _dt.datetime.now,  # what schedule itself reads
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_due = on_due
        self.wall = wall
        self.monotonic = monotonic
        self.scheduler = schedule.Scheduler()
        self.interval = 0.0
        self._offset = 0.0

    def _wall_minus_monotonic(self) -> float:
        return (self.wall() - _EPOCH).total_seconds() - self.monotonic()

    def every(self, interval: float) -> None:
        self.interval = interval
        self.scheduler.clear()
        # schedule types the interval as int; its timedelta takes the float (1.5 s) as it is
        self.scheduler.every(interval).seconds.do(self.on_due)  # type: ignore[arg-type]
        self._offset = self._wall_minus_monotonic()

    def run_pending(self) -> None:
        step = self._wall_minus_monotonic() - self._offset
        if abs(step) > CLOCK_STEP_SECONDS:
            log.info(f"the wall clock stepped by {step:+.0f} s; passes keep their interval")
            self.every(self.interval)
        self.scheduler.run_pending()

    @property
    def idle_seconds(self) -> float | None:
        return self.scheduler.idle_seconds


_EPOCH = _dt.datetime(1970, 1, 1)


def pass_making_progress(
    now: float, last_progress: float, period: float, in_flight: list[Any]
) -> bool:
    """Whether a running pass counts as making progress for the watchdog (contract 5).

    A request within its whole-answer limit is progress, one past it is not; with no request
    under way, the pass must have moved on (a job done, a request finished) within one
    watchdog `period`: a wait for a lock longer than that is not progress. `in_flight` holds
    remote.RequestInFlight records (anything with `within_limit(now)`).
    """
    if in_flight:
        return all(request.within_limit(now) for request in in_flight)
    return now - last_progress < period


def _release_memory() -> None:
    """Give the freed job records back to the OS between passes (idle RSS stays small)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


PassResult = PassSummary | BaseException | None


class PassWorker:
    """Runs one pass at a time in a thread of its own, so that SIGTERM can abandon a pass stuck
    in a request (the idempotent create makes that safe) while the daemon's loop stays free for
    wake-ups, reloads and the watchdog. When its pass ends, the thread writes a byte to
    `wake_fd` (the loop's self-pipe); the loop then calls `finish()`."""

    def __init__(self, store: Store, wake_fd: int, stop_requested: Callable[[], bool]) -> None:
        self.store = store
        self.wake_fd = wake_fd
        self.stop_requested = stop_requested
        self.thread: threading.Thread | None = None
        self.result: PassResult = None
        self.counts: dict[str, int] | None = None  # jobs per status after the pass, if folded
        # When the pass last showed it moves on (it asks whether to stop between jobs).
        self.heartbeat = time.monotonic()

    @property
    def running(self) -> bool:
        return self.thread is not None

    def start(self, run: Callable[[Callable[[], bool]], PassSummary]) -> None:
        """Run `run(should_stop)` in the thread; its summary, or what it raised, is the result."""
        self.heartbeat = time.monotonic()

        def should_stop() -> bool:
            self.heartbeat = time.monotonic()
            return self.stop_requested()

        def work() -> None:
            try:
                result: PassResult = run(should_stop)
            except BaseException as exc:  # reported by the loop
                result = exc
            finally:
                counts: dict[str, int] | None = None
                if self.store.loaded:  # a no-change pass never folds the store
                    counts = {}
                    for _, _, status in self.store.jobs.summaries():
                        counts[status] = counts.get(status, 0) + 1
                self.counts = counts
                self.store.unload()
            self.result = result
            try:
                os.write(self.wake_fd, b"p")
            except OSError:
                pass

        self.thread = threading.Thread(target=work, name="jobsyncd-pass", daemon=True)
        self.thread.start()

    def ended(self) -> bool:
        # The thread sets its result just before it ends: finish on that, not on is_alive(),
        # which may still be true when its wake-up byte has been read.
        return self.thread is not None and (self.result is not None or not self.thread.is_alive())

    def finish(self) -> tuple[PassResult, dict[str, int] | None]:
        """Join the ended pass; returns its result and the job counts."""
        assert self.thread is not None
        self.thread.join()
        self.thread = None
        result, self.result = self.result, None
        if self.counts is not None:
            _release_memory()  # the pass folded the store; a sparse pass freed little
        return result, self.counts

    def making_progress(self, now: float, period: float) -> bool:
        """For the watchdog: see `pass_making_progress`."""
        from .remote import last_request_finished, requests_in_flight  # loaded by the pass

        finished = last_request_finished()
        last_progress = max(self.heartbeat, finished if finished is not None else self.heartbeat)
        return pass_making_progress(now, last_progress, period, requests_in_flight())

    def abandon(self, grace: float) -> bool:
        """Give a running pass `grace` seconds to end; returns whether it is still running."""
        if self.thread is None:
            return False
        self.thread.join(grace)
        return self.thread.is_alive()

    def stuck(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Daemon:
    def __init__(self, runtime: Runtime, interval_override: float | None) -> None:
        self.runtime = runtime
        self.settings: Settings = runtime.settings
        self.interval_override = interval_override
        self.store: Store = runtime.store
        self.data_dir = self.settings.data_dir
        self.notifier = Notifier.from_env()
        self.token: str | None = None
        self.stop_requested = False
        self.reload_requested = False
        self.pass_requested = True  # a pass at start
        self.schedule = PassSchedule(self._scheduled)
        self.sock: socket.socket | None = None
        self.pipe_r, self.pipe_w = os.pipe()
        os.set_blocking(self.pipe_w, False)
        os.set_blocking(self.pipe_r, False)
        self.worker = PassWorker(self.store, self.pipe_w, lambda: self.stop_requested)
        self._stuck_logged = False
        # `sync --wait` callers: answered by the first pass that starts after their request.
        self.waiters_next: list[str] = []
        self.waiters_this: list[str] = []
        self.pass_log = PassLog(verbose=runtime.verbose)
        self.live: Any = None  # the long-poll on the change feed (live.LivePoller)

    # ---- start-up -------------------------------------------------------------------------
    @property
    def interval(self) -> float:
        return self.interval_override or self.settings.interval_seconds

    def _take_lock(self) -> FileLock:
        path = os.path.join(self.data_dir, DAEMON_LOCK_NAME)
        if os.path.islink(path):
            raise SymlinkRefused(path)
        # The store's flock lock (fsutil): the `filelock` package did the same here, and its
        # import cost the daemon's start-up ~20 ms. flock dies with its holder: a SIGKILLed
        # daemon leaves no stale lock. Retried for a second, so a `status` probe never fails us.
        lock = FileLock(path, timeout=1.0, what="the daemon lock")
        try:
            lock.acquire()
        except TryLater:
            pid = _read_pid(self.data_dir)
            holder = f"pid {pid}" if pid else "another process"
            raise TryLater(f"another daemon ({holder}) already runs for {self.data_dir}") from None
        except SymlinkRefused:
            raise
        except JobsyncdError as exc:  # a data dir that cannot be written
            raise JobsyncdError(f"cannot take the daemon lock: {exc}") from None
        try:
            write_file_atomically(self.data_dir, DAEMON_PID_NAME, f"{os.getpid()}\n".encode())
        except BaseException:
            lock.release()
            raise
        return lock

    def _bind_socket(self) -> None:
        path = os.path.join(self.data_dir, SOCKET_NAME)
        try:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(path)  # a stale socket of an earlier daemon (we hold the lock)
            else:
                raise JobsyncdError(f"{path} exists and is not our socket; refusing to replace it")
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            log.warning(
                f"cannot listen for wake-ups at {path}: {exc.strerror}; syncing on schedule only"
            )
            return
        sock.setblocking(False)
        self.sock = sock

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.pipe_w, warn_on_full_buffer=False)

        def on_signal(signum: int, frame: Any) -> None:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop_requested = True
            elif signum == signal.SIGHUP:
                self.reload_requested = True
            elif signum == signal.SIGUSR1:
                self.pass_requested = True

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, on_signal)

    def _reschedule(self) -> None:
        self.schedule.every(self.interval)

    def _scheduled(self) -> None:
        self.pass_requested = True

    # ---- live: the long-poll on the change feed ---------------------------------------------
    def _start_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        if not self.settings.live:
            return
        from .live import LivePoller
        from .runner import make_remote

        settings, token = self.settings, self.token

        def request_pass() -> None:
            self.pass_requested = True
            try:
                os.write(self.pipe_w, b"l")
            except OSError:
                pass

        self.live = LivePoller(
            make_remote=lambda: make_remote(settings, token),
            data_dir=self.data_dir,
            api_base=check_server_url(settings),
            request_pass=request_pass,
            pass_running=lambda: self.worker.running,
            backoff_base=settings.backoff_base_seconds,
            interval=self.interval,
        )
        self.live.start()

    # ---- passes -------------------------------------------------------------------------------
    def _start_pass(self) -> None:
        settings, token, store, data_dir = self.settings, self.token, self.store, self.data_dir
        self.pass_requested = False
        self.waiters_this, self.waiters_next = self.waiters_next, []

        def run(should_stop: Callable[[], bool]) -> PassSummary:
            with sync_lock(data_dir):
                return execute_pass(settings, store, token, should_stop=should_stop)

        self.worker.start(run)

    def _finish_pass(self) -> None:
        result, counts = self.worker.finish()
        if self.live is not None:
            self.live.pass_finished()
        self._answer_waiters(result)
        if isinstance(result, PassSummary):
            line = describe(result)
            self.pass_log.report(result, line)
            status = f"{line} at {time.strftime('%H:%M:%S')}"
            if counts is not None:
                held = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                status += f"; jobs: {held or 'none'}"
            self.notifier.status(status)
            if result.again:
                self.pass_requested = True
        else:
            log.error(f"the pass failed: {result}")
            self.notifier.status(f"last pass failed: {result}")

    # ---- sync --wait ---------------------------------------------------------------------------
    def _add_waiter(self, name: bytes) -> None:
        # Only a reply socket in our own data dir, by a name the CLI makes: never a path a
        # datagram could point anywhere else.
        reply = reply_socket_path(self.data_dir, name.decode("ascii", "replace"))
        if reply is None:
            return
        self.waiters_next.append(reply)
        ack = {"ack": True, "pid": os.getpid(), "interval_seconds": self.interval}
        send_reply(reply, ack)

    def _answer_waiters(self, result: PassSummary | BaseException | None) -> None:
        waiters, self.waiters_this = self.waiters_this, []
        if not waiters:
            return
        if isinstance(result, PassSummary):
            from .runner import exit_code_for

            summary = {**result.public(), "handed_to_daemon": os.getpid()}
            answer = {"summary": summary, "code": exit_code_for(result), "message": result.message}
        else:
            answer = {"summary": None, "code": 1, "message": f"the pass failed: {result}"}
        for reply in waiters:
            send_reply(reply, answer)

    # ---- reload -------------------------------------------------------------------------------
    def _reload(self) -> None:
        self.reload_requested = False
        self.notifier.reloading()
        try:
            new = self.runtime.reload()
            check_server_url(new)
            token, warnings = read_token(new)
            if new.data_dir != self.settings.data_dir:
                raise ConfigError("data_dir cannot change while the daemon runs (restart it)")
        except JobsyncdError as exc:
            log.error(f"reload refused, keeping the old configuration: {exc}")
        else:
            for message in (*new.warnings, *warnings):
                log.warning(message)
            self.settings, self.token = new, token
            self._reschedule()
            self._start_live()
            log.info(
                f"reloaded the configuration (server {new.server_url}, interval {self.interval:g} s)"
            )
            self.pass_requested = True
        self.notifier.ready()

    # ---- the loop -----------------------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            try:
                os.read(self.pipe_r, 4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            else:
                continue
        if self.sock is not None:
            for _ in range(10_000):
                try:
                    data = self.sock.recv(256)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                self.pass_requested = True
                if data.startswith(WAIT_PREFIX):
                    self._add_waiter(data[len(WAIT_PREFIX) :])

    def run(self) -> int:
        check_server_url(self.settings)
        self.token, warnings = read_token(self.settings)
        for message in warnings:
            log.warning(message)
        lock = self._take_lock()
        try:
            self._bind_socket()
            self._install_signals()
            self.store.load()  # readable before we say READY
            self.store.unload()
            self._reschedule()
            log.info(
                f"started (pid {os.getpid()}, data dir {self.data_dir}, server {self.settings.server_url}, interval {self.interval:g} s)"
            )
            self._start_live()
            self.notifier.ready()
            self._loop()
        finally:
            if self.live is not None:
                self.live.stop()
            self.notifier.stopping()
            self._shutdown(lock)
        return 0

    def _loop(self) -> None:
        watchdog = self.notifier.watchdog_interval()
        next_ping = time.monotonic()
        while not self.stop_requested:
            if self.reload_requested:
                self._reload()
            if self.worker.ended():
                self._finish_pass()
            self.schedule.run_pending()
            now = time.monotonic()
            wait = min(max(self.schedule.idle_seconds or 1.0, 0.0), 60.0)
            if self.pass_requested and not self.worker.running:
                until = read_backoff_until(self.data_dir)
                if until is not None and until > time.time():
                    wait = min(wait, until - time.time())  # one pass when the window ends
                else:
                    self._start_pass()
            if watchdog is not None:
                if now >= next_ping:
                    # Stuck (a request past its whole-answer limit, or no progress for a whole
                    # watchdog period, a lock wait included): stop pinging, systemd restarts us.
                    if not self.worker.running or self.worker.making_progress(now, 2 * watchdog):
                        self.notifier.watchdog()
                        self._stuck_logged = False
                    elif not self._stuck_logged:
                        log.error(
                            "the pass has made no progress for a watchdog period; not pinging the watchdog"
                        )
                        self._stuck_logged = True
                    next_ping = now + watchdog
                wait = min(wait, max(next_ping - now, 0.0))
            readable = [self.pipe_r] + ([self.sock] if self.sock is not None else [])
            try:
                select.select(readable, [], [], max(wait, 0.0))
            except InterruptedError:
                pass
            self._drain()

    def _shutdown(self, lock: FileLock) -> None:
        log.info("stopping")
        self._drain()  # a `sync --wait` that came in just now gets its answer too
        stopped = {"summary": None, "code": 75, "message": "the daemon stopped before its pass"}
        for reply in self.waiters_this + self.waiters_next:
            send_reply(reply, stopped)
        if self.worker.abandon(STOP_GRACE_SECONDS):
            log.warning("abandoned the request in flight (the next pass repeats it safely)")
        if self.sock is not None:
            self.sock.close()
            try:
                os.unlink(os.path.join(self.data_dir, SOCKET_NAME))
            except OSError:
                pass
        try:
            os.unlink(os.path.join(self.data_dir, DAEMON_PID_NAME))
        except OSError:
            pass
        lock.release()
        log.info("stopped")


def _read_pid(data_dir: str) -> int | None:
    try:
        with open(os.path.join(data_dir, DAEMON_PID_NAME), encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def run_daemon(runtime: Runtime, interval: float | None) -> int:
    log.configure(verbose=runtime.verbose, quiet=runtime.quiet, daemon=True)
    daemon = Daemon(runtime, interval)
    code = daemon.run()
    if daemon.worker.stuck():
        # A pass is stuck in a request: leave without waiting for it (store writes are atomic).
        import sys

        sys.stderr.flush()
        os._exit(code)
    return code

