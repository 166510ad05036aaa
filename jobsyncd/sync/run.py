"""`run_pass`: one pass put together from the push and the pull (see the package's docstring);
`count_due` for `status`. Imported when a pass runs, not by a `sync` that hands over."""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import random
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from ..api import RemoteAPI
from ..model import utc_now
from ..store import Store
from .journal import Journal, PassContext
from .pull import Puller, synced_ids
from .push import Pusher
from .rules import PassSummary, Policy, StopPass, is_due, longest_backoff

P = ParamSpec("P")
R = TypeVar("R")

SPARSE_MAX_DUE = 32  # at most this many due jobs are pushed without folding the store


def _without_cycle_collector(run: Callable[P, R]) -> Callable[P, R]:
    """Run without Python's cyclic garbage collector, which a pass of 100,000 jobs would keep
    waking to walk every job again as it replaces them (a third of a first sync's time). The
    pass frees what it makes by reference counting; the collector runs again afterwards."""

    @functools.wraps(run)
    def without(*args: P.args, **kwargs: P.kwargs) -> R:
        collecting = gc.isenabled()
        gc.disable()
        try:
            return run(*args, **kwargs)
        finally:
            if collecting:
                gc.enable()

    return without


def prepare_pass(store: Store) -> None:
    """Before a pass's slow start (its HTTP client's imports): if the pass will fold the store
    (too many due jobs to push it unfolded), start reading what the fold will hold."""
    store.fold_lazily = True
    if not store.loaded and store.due_candidates(SPARSE_MAX_DUE) is None:
        store.prefetch()


@_without_cycle_collector
def run_pass(
    store: Store,
    remote: RemoteAPI,
    policy: Policy,
    now: Callable[[], _dt.datetime] = utc_now,
    rng: random.Random | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int], Any] | None = None,
    pull_state: dict[str, Any] | None = None,
    upload_progress: Callable[[int, int], Any] | None = None,
) -> PassSummary:
    """Run one pass against `remote`. `pull_state` (what is known of the
    server: ETag, checkpoint, offers) is read and updated in place; `upload_progress(done,
    total)` sees each upload's bytes."""
    summary = PassSummary()
    # Lines an earlier pass's fold checked stay unparsed until the pass asks for their jobs.
    store.fold_lazily = True
    state = pull_state if pull_state is not None else {}
    journal = Journal(store, policy, summary, now, rng or random.Random())
    ctx = PassContext(store, remote, policy, journal, summary, should_stop, state)
    pusher = Pusher(ctx, progress, upload_progress)
    puller = Puller(ctx)
    # A store not folded yet in which no line names a status that needs a push: skip the push
    # and fold the store only if the listing changed. A no-change pass then reads no job at all.
    # A few due jobs in a store not folded (a create while the daemon idles): they are pushed
    # without folding 100,000 jobs; the pull then folds only if it must (listing mode).
    found = None if store.loaded else store.due_candidates(SPARSE_MAX_DUE)
    lazy = found == []
    candidates = None if lazy else found
    if candidates is not None and not _bound_once(store, candidates):
        candidates = None  # a store that breaks the one-binding invariant: fold (and repair)
    if candidates is not None:
        journal.sparse = True
    begin_synced = None if (lazy or candidates is not None) else synced_ids(store.refresh())
    try:
        if not lazy:
            pusher.push(now(), candidates)
        if not should_stop():
            puller.pull(begin_synced)
    except StopPass as stop:
        journal.flush()
        summary.ok = False
        summary.skipped = stop.skipped
        summary.retry_after = stop.retry_after
        summary.message = str(stop)
        return summary
    store.compact_if_worth_it()  # a pass that wrote many outcomes leaves many dead records
    if summary.errors or summary.failed:
        summary.ok = False
    if should_stop():
        summary.ok = False
    return summary


def _bound_once(store: Store, local_ids: list[str]) -> bool:
    for local_id in local_ids:
        job = store.lookup(local_id)
        if job is not None and job.server_id is not None and not store.bound_once(job.server_id):
            return False
    return True


def count_due(store: Store, now: _dt.datetime | None = None, policy: Policy | None = None) -> int:
    now = now or utc_now()
    max_wait = longest_backoff(policy) if policy is not None else None
    return sum(1 for j in store.refresh().may_be_due() if is_due(j, now, max_wait))
