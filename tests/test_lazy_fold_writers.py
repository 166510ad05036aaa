"""Lazy passes among other writers: whatever other processes append, edit, compact or write
in another layout (before a prefetch, between it and the load, between the load and the pass's
end), a lazy fold answers as an eager one, and the due hint a pass leaves at its end never hides
a due job. Random runs with tiny chunk, compaction and parse thresholds, so that every path
(coalescing, several chunks, parse-all) runs. Written by a review of the index and the prefetch.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from test_lazy_fold import checked_store, eager_records, records, store_of
from test_store import job

from jobsyncd.model import Job
from jobsyncd.store import HINT_NAME, STORE_NAME, Store, prepare_data_dir

DUE = ("pending", "pending_deletion", "error")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    prepare_data_dir(str(d))
    return d


# ---- a binding another process writes during a pass ---------------------------------------------


def test_a_binding_folded_by_refresh_is_not_recorded_as_checked_by_the_passs_compaction(
    data_dir,
):
    """A line another process appends during a pass that binds a server id a second job holds
    is folded by refresh() without the one-binding check a load makes (and kept out of the
    checked range). If the pass's end then compacts, its output must not be recorded as
    checked: a lazy fold of it would hold every line raw and never look for the duplicate,
    where an eager fold repairs it (two local jobs on one server job: a push of one would
    overwrite or delete the other's server copy, contract 6.3/6.4). Found by the review; older
    than the index, which would have made it last across every later pass."""
    holder = job("holder", server_id="S", sync_status="synced")
    other = job("other")
    filler = [job(f"f{i}", server_id=f"s-{i}", sync_status="synced") for i in range(10)]
    checked_store(data_dir, [holder, other, *filler])
    a_pass, _ = store_of(data_dir)
    a_pass.load()
    dup = other.clone()
    dup.server_id, dup.sync_status = "S", "pending"  # written by another process meanwhile
    Store(str(data_dir)).append([dup])
    a_pass.refresh()
    a_pass._rewrite()  # the pass's end compacts (compact_if_worth_it, when worth it)
    eager, eager_warned = store_of(data_dir, lazy=False)
    eager_bound = [lid for lid, j in eager.load().items() if j.server_id == "S"]
    assert len(eager_bound) == 1 and any("bound to 2" in w for w in eager_warned)
    lazy, lazy_warned = store_of(data_dir)
    lazy_bound = [lid for lid, sid, _ in lazy.load().summaries() if sid == "S"]
    assert lazy_bound == eager_bound, "the lazy fold keeps a server id bound to two jobs"


# ---- random runs -----------------------------------------------------------------------------


def _eager(d: str) -> dict[str, dict]:
    s = Store(d, warn=lambda m: None)
    try:
        return {k: v.record() for k, v in s.load().items()}
    finally:
        s.unload()


def _other_process_writes(rng: random.Random, d: str) -> None:
    choice = rng.random()
    if choice < 0.25:
        s = Store(d, warn=lambda m: None)
        s.compact()
        s.unload()
        return
    if choice < 0.6:
        Store(d, warn=lambda m: None).append([job("other", sync_status=rng.choice(DUE + ("synced",)))])
        return
    current = _eager(d)
    if current:
        edited = Job.from_record(current[rng.choice(sorted(current))])
        edited.sync_status = rng.choice(DUE + ("synced", "failed"))
        edited.text += "o"
        Store(d, warn=lambda m: None).append([edited])


@pytest.mark.parametrize("seed", range(12))
def test_lazy_passes_among_other_writers_fold_as_eager_and_leave_a_true_due_hint(
    data_dir, monkeypatch, seed
):
    """Random runs of lazy passes (a fresh Store or the daemon's long-lived
    one, with or without a prefetch; edits, purges, adopted jobs) among other processes'
    creates, edits, foreign-layout lines and compactions (also between prefetch and load,
    between load and the pass's end, and between refresh and the hint write), with tiny
    MAX_CHUNKS / CHUNK_LINES / AUTO_COMPACT_MIN_LINES / _FEW_HEADS / _PARSE_ALL_AFTER so that
    coalescing, multi-chunk compaction and parse-all paths all run: after every step a lazy
    fold equals an eager one, and due_candidates() (which trusts the hint _keep_due_hint left)
    names exactly the jobs whose status needs a push."""
    import jobsyncd.store as store_module
    from jobsyncd import jobtable

    monkeypatch.setattr(store_module, "MAX_CHUNKS", 3)
    monkeypatch.setattr(store_module, "CHUNK_LINES", 7)
    monkeypatch.setattr(store_module, "AUTO_COMPACT_MIN_LINES", 20)
    monkeypatch.setattr(store_module, "_FEW_HEADS", 2)
    monkeypatch.setattr(jobtable, "_PARSE_ALL_AFTER", 5)
    rng = random.Random(seed)
    d = str(data_dir)
    statuses = DUE + ("synced", "failed")
    daemon = Store(d, warn=lambda m: None)
    serial = iter(range(10**6))
    for _ in range(25):
        op = rng.choice(["create", "foreign", "pass", "pass", "daemon", "other"])
        if op == "create":
            jobs = [
                job(
                    "c",
                    sync_status=rng.choice(statuses),
                    server_id=f"s{next(serial)}" if rng.random() < 0.5 else None,
                    metadata=rng.choice([{}, {"sync_status": rng.choice(statuses)}]),
                )
                for _ in range(rng.randint(1, 20))
            ]
            Store(d, warn=lambda m: None).append(jobs)
        elif op == "foreign":
            current = _eager(d)
            if current:
                rec = dict(current[rng.choice(sorted(current))])
                rec["sync_status"], rec["by"] = rng.choice(statuses), "another writer"
                line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False)
                with open(os.path.join(d, STORE_NAME), "ab") as f:
                    f.write(line.encode() + b"\n")
        elif op == "other":
            _other_process_writes(rng, d)
        else:
            s = daemon if op == "daemon" else Store(d, warn=lambda m: None)
            s.fold_lazily = True
            if rng.random() < 0.5:
                s.prefetch()
                if rng.random() < 0.5:
                    s._prefetch[0].join()
                    _other_process_writes(rng, d)
            table = s.load()
            keys = list(table)
            purge = rng.sample(keys, 1) if keys and rng.random() < 0.3 else []
            edits = []
            for k in rng.sample(keys, min(len(keys), rng.randint(0, 6))):
                if k not in purge:
                    edited = table[k].clone()
                    edited.sync_status = rng.choice(statuses)
                    edited.text += "p"
                    edits.append(edited)
            if edits or purge:
                s.append(edits, purge, compact=False, adopt=rng.random() < 0.5)
            if rng.random() < 0.5:
                _other_process_writes(rng, d)
            s.compact_if_worth_it()
            s.unload()
        expected = _eager(d)
        lazy, _ = store_of(data_dir)
        assert records(lazy.load()) == expected
        lazy.unload()
        due = sorted(k for k, r in expected.items() if r["sync_status"] in DUE)
        look = Store(d, warn=lambda m: None)
        found = look.due_candidates(10**6)
        assert found is None or sorted(found) == due


def test_the_hint_a_pass_leaves_names_due_jobs_held_raw_and_parsed(data_dir):
    """_keep_due_hint writes the table's due jobs: raw lines whose status is
    due (error in backoff, pending_deletion), parsed ones, metadata that names a due status
    on a synced job (not due), a tombstoned due job (not due); the next due_candidates(),
    searching only from the hint's end, finds exactly those plus what was appended since."""
    backing_off = job("in backoff", server_id="s-b", sync_status="error", retry_count=3,
                      next_attempt_at="2999-01-01T00:00:00Z")
    deleting = job("deleting", server_id="s-d", sync_status="pending_deletion")
    lead = job("lead", server_id="s-l", sync_status="synced", metadata={"sync_status": "pending"})
    doomed = job("doomed", sync_status="pending")
    synced = [job(f"s{i}", server_id=f"s-{i}", sync_status="synced") for i in range(20)]
    checked_store(data_dir, [backing_off, deleting, lead, doomed, *synced])
    a_pass, _ = store_of(data_dir)
    a_pass.load()
    pushed = synced[0].clone()
    pushed.sync_status = "error"
    a_pass.append([pushed], purge=[doomed.local_id], compact=False)
    a_pass.compact_if_worth_it()
    hint = json.loads((data_dir / HINT_NAME).read_bytes())
    assert sorted(hint["due"]) == sorted([backing_off.local_id, deleting.local_id, pushed.local_id])
    new = job("after the pass")
    Store(str(data_dir)).append([new])
    look = Store(str(data_dir))
    assert sorted(look.due_candidates(64)) == sorted(hint["due"] + [new.local_id])
    assert records(a_pass.refresh()) == eager_records(data_dir)
