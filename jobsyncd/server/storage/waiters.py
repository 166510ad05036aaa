"""Long-polls waiting for a user's next change, and the call that wakes them.

An engine wakes the waiters of a user when it learns of a change (its own commit, a PostgreSQL
NOTIFY, a changed counter in SQLite); a waiter armed with the counter it last read is woken only
when the counter moved past it, so a wake-up that races with the arming is never lost.
"""

from __future__ import annotations

import threading


class Waiter:
    __slots__ = ("event", "version")

    def __init__(self, version: int) -> None:
        self.event = threading.Event()
        self.version = version


class Waiters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_user: dict[str, set[Waiter]] = {}

    def arm(self, user: str, version: int) -> Waiter:
        waiter = Waiter(version)
        with self._lock:
            self._by_user.setdefault(user, set()).add(waiter)
        return waiter

    def disarm(self, user: str, waiter: Waiter) -> None:
        with self._lock:
            waiting = self._by_user.get(user)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self._by_user[user]

    def users(self) -> dict[str, int]:
        """Each waited-for user with the smallest counter a waiter of theirs knows."""
        with self._lock:
            return {u: min(w.version for w in ws) for u, ws in self._by_user.items() if ws}

    def wake(self, user: str, version: int | None = None) -> None:
        """Wake the user's waiters (those that know an older counter than `version`, if given)."""
        with self._lock:
            waiting = list(self._by_user.get(user, ()))
        for waiter in waiting:
            if version is None or waiter.version != version:
                waiter.event.set()

    def wake_all(self) -> None:
        with self._lock:
            waiting = [w for ws in self._by_user.values() for w in ws]
        for waiter in waiting:
            waiter.event.set()

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._by_user)
