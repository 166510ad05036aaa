"""Finding jobs in the store without folding it: the backward look-up of one job and the due
hint (jobs.hint.json) that lets the next look read only the lines appended since.

Both must agree with a full fold of the same file, whatever was appended, compacted, torn or
garbled in between, and whatever state the hint file is in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobsyncd.store as store_module
from jobsyncd.model import Job, new_local_id, rfc3339, utc_now
from jobsyncd.store import (
    HINT_NAME,
    STORE_NAME,
    FileView,
    Store,
    encode_record,
    prepare_data_dir,
)

DUE = ("pending", "pending_deletion", "error")
STATUSES = ("pending", "pending_deletion", "error", "synced", "failed")


def _job(local_id: str, status: str, meta: dict | None = None) -> Job:
    now = rfc3339(utc_now())
    job = Job(local_id=local_id, text="t", metadata=meta or {}, created_at=now, updated_at=now)
    job.sync_status = status
    if status in ("synced", "pending_deletion"):
        job.server_id = "s-" + local_id[:8]
    return job


def _fresh(tmp_path: Path, name: str) -> tuple[Store, Path]:
    data = tmp_path / name
    prepare_data_dir(str(data))
    return Store(str(data), warn=lambda m: None), data


def _truly_due(data: Path) -> set[str]:
    jobs = Store(str(data), warn=lambda m: None).load()
    return {j.local_id for j in jobs.values() if j.sync_status in DUE}


def test_a_job_appended_after_the_hint_is_found_and_one_synced_since_is_not(tmp_path: Path):
    store, data = _fresh(tmp_path, "d")
    ids = [new_local_id() for _ in range(50)]
    store.append([_job(i, "synced") for i in ids])
    assert store.due_candidates(32) == []
    assert (data / HINT_NAME).exists()
    fresh = new_local_id()
    store.append([_job(fresh, "pending")])
    assert Store(str(data)).due_candidates(32) == [fresh]  # another process, from the file
    store.append([_job(fresh, "synced")])
    assert store.due_candidates(32) == []


def test_the_hint_file_is_private_and_names_no_job_text(tmp_path: Path):
    store, data = _fresh(tmp_path, "d")
    store.append([_job(new_local_id(), "pending", {"secret": "x"})])
    store.due_candidates(32)
    assert oct((data / HINT_NAME).stat().st_mode & 0o777) == "0o600"
    assert b"secret" not in (data / HINT_NAME).read_bytes().replace(b"7365637265", b"")


@pytest.mark.parametrize(
    "damage",
    ["garbage", "empty", "other_file", "wrong_end", "moved_end", "missing"],
)
def test_a_hint_that_does_not_describe_the_file_is_not_used(tmp_path: Path, damage: str):
    store, data = _fresh(tmp_path, "d")
    due = new_local_id()
    store.append([_job(new_local_id(), "synced") for _ in range(20)] + [_job(due, "pending")])
    store.due_candidates(32)
    hint = json.loads((data / HINT_NAME).read_text())
    hint["due"] = []  # a damaged hint that claims nothing is due must not hide `due`
    if damage == "garbage":
        (data / HINT_NAME).write_bytes(b"\x00\xff{not json")
    elif damage == "empty":
        (data / HINT_NAME).write_bytes(b"")
    elif damage == "other_file":
        hint["ident"][1] += 1
        (data / HINT_NAME).write_text(json.dumps(hint))
    elif damage == "wrong_end":
        hint["end"] -= 7  # its probe bytes no longer match
        (data / HINT_NAME).write_text(json.dumps(hint))
    elif damage == "moved_end":
        hint["end"] = 10**9  # past the end of the file
        (data / HINT_NAME).write_text(json.dumps(hint))
    else:
        (data / HINT_NAME).unlink()
    assert Store(str(data)).due_candidates(32) == [due]


def test_a_compacted_store_is_searched_whole_not_from_the_old_hint(tmp_path: Path):
    store, data = _fresh(tmp_path, "d")
    ids = [new_local_id() for _ in range(40)]
    store.append([_job(i, "synced") for i in ids])
    for i in ids:
        store.append([_job(i, "synced")])  # dead lines, so compaction shrinks the file
    assert store.due_candidates(32) == []
    due = ids[3]
    store.append([_job(due, "error")])
    Store(str(data)).compact()
    assert Store(str(data)).due_candidates(32) == [due]


def _record_lines(draw_ops: list[tuple[str, int, str]], ids: list[str]) -> list[bytes]:
    lines = []
    for kind, which, status in draw_ops:
        local_id = ids[which]
        if kind == "job":
            lines.append(encode_record(_job(local_id, status).record()))
        elif kind == "meta":  # a status named inside metadata: a false positive, never a miss
            lines.append(encode_record(_job(local_id, "synced", {"sync_status": status}).record()))
        elif kind == "purge":
            lines.append(encode_record({"local_id": local_id, "purged": True}))
        else:  # an unreadable line in the middle of the file
            lines.append(b'{"local_id":"' + local_id.encode() + b'","sync_status":"pend\n')
    return lines


OPS = st.lists(
    st.tuples(
        st.sampled_from(["job", "job", "job", "meta", "purge", "junk"]),
        st.integers(0, 7),
        st.sampled_from(STATUSES),
    ),
    max_size=12,
)


@pytest.fixture(autouse=True)
def _few_heads_restored():
    yield
    store_module._FEW_HEADS = 8


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=st.lists(st.tuples(OPS, st.booleans(), st.booleans()), min_size=1, max_size=6))
def test_due_candidates_with_hints_are_exactly_the_due_jobs(tmp_path_factory, rounds):
    """Appends by other processes, compactions and lost hints in any order: the candidates are
    exactly the jobs a full fold finds due."""
    data = tmp_path_factory.mktemp("h")
    prepare_data_dir(str(data))
    ids = [new_local_id() for _ in range(8)]
    daemon = Store(str(data), warn=lambda m: None)  # keeps its hint in memory between looks
    for i, (ops, compact, lose_hint) in enumerate(rounds):
        # Odd rounds resolve every due-named job by the one-scan path (_last_lines), even
        # rounds job by job backwards from the end (the path for a few).
        store_module._FEW_HEADS = 0 if i % 2 else 8
        with open(data / STORE_NAME, "ab") as fh:
            fh.write(b"".join(_record_lines(ops, ids)))
        if compact:
            Store(str(data), warn=lambda m: None).compact()
        if lose_hint and (data / HINT_NAME).exists():
            (data / HINT_NAME).unlink()
        for looker in (daemon, Store(str(data), warn=lambda m: None)):
            found = looker.due_candidates(100)
            if found is not None:  # exact: a status named in metadata is not a due job
                assert set(found) == _truly_due(data)
                assert looker.may_hold_due_jobs() == bool(found)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, torn=st.binary(max_size=30).filter(lambda b: b"\n" not in b))
def test_a_backward_lookup_agrees_with_a_full_fold(tmp_path_factory, ops, torn):
    data = tmp_path_factory.mktemp("l")
    prepare_data_dir(str(data))
    ids = [new_local_id() for _ in range(8)]
    (data / STORE_NAME).write_bytes(b"".join(_record_lines(ops, ids)) + torn)
    folded = Store(str(data), warn=lambda m: None).load()
    looker = Store(str(data), warn=lambda m: None)
    for local_id in ids:
        found = looker.lookup(local_id)
        want = folded.get(local_id)
        assert (found.record() if found else None) == (want.record() if want else None)


@settings(max_examples=300, deadline=None)
@given(
    blob=st.binary(max_size=40_000).map(lambda b: b.replace(b"\x00", b"ab")),
    sub=st.sampled_from([b"\n", b"ab", b"abab", b"\nab\n", b"zz"]),
    start=st.integers(-5, 45_000),
    end=st.one_of(st.none(), st.integers(0, 45_000)),
)
def test_a_file_view_finds_what_bytes_find(tmp_path_factory, blob, sub, start, end):
    """FileView reads the file in growing chunks; every find and rfind, in any window, must
    answer what bytes would (a match across two chunks included)."""
    path = tmp_path_factory.mktemp("v") / "f"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        view = FileView(fd, len(blob))
        view.FIRST_CHUNK = 7  # many chunk edges in a small file
        view.MAX_CHUNK = 64
        lo = max(start, 0)
        assert view.find(sub, lo, end) == blob.find(sub, lo, end)
        assert view.rfind(sub, lo, end) == blob.rfind(sub, lo, end)
        assert view[lo : end] == blob[lo:end]
        assert len(view) == len(blob)
    finally:
        os.close(fd)


def test_a_lookup_sees_what_another_process_wrote_since_the_last_lookup(tmp_path: Path):
    store, data = _fresh(tmp_path, "d")
    lid = new_local_id()
    store.append([_job(lid, "pending")])
    reader = Store(str(data))
    assert reader.lookup(lid).sync_status == "pending"
    Store(str(data)).append([_job(lid, "synced")])
    assert reader.lookup(lid).sync_status == "synced"
    other = Store(str(data))
    other.append([_job(lid, "error")])
    other.compact()
    assert reader.lookup(lid).sync_status == "error"
    got = reader.lookup(lid)
    got.text = "changed by the caller"
    assert reader.lookup(lid).text == "t"  # answers are copies
