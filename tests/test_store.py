"""The JSON-lines store (contract section 4): fold, find, compaction, repair, locking, safety."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import poll

from jobsyncd.errors import JobsyncdError, NoSuchJob, SymlinkRefused
from jobsyncd.model import Job, new_local_id, rfc3339, utc_now
from jobsyncd.store import (
    AUTO_COMPACT_MIN_LINES,
    LOCK_NAME,
    STORE_NAME,
    TMP_NAME,
    Store,
    encode_record,
    prepare_data_dir,
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    prepare_data_dir(str(d))
    return d


class Warnings(list):
    def __call__(self, message: str) -> None:
        self.append(message)


def make_store(data_dir: Path) -> tuple[Store, Warnings]:
    warned = Warnings()
    return Store(str(data_dir), warn=warned), warned


def job(text: str = "", local_id: str | None = None, **kw) -> Job:
    now = rfc3339(utc_now())
    return Job(local_id=local_id or new_local_id(), text=text, created_at=now, updated_at=now, **kw)


def lines_of(path: Path) -> list[bytes]:
    return [ln for ln in path.read_bytes().split(b"\n") if ln.strip()]


def fresh_jobs(data_dir: Path) -> dict[str, Job]:
    store, warned = make_store(data_dir)
    jobs = store.load()
    return jobs


# ---- fold ------------------------------------------------------------------------------------


def test_later_records_supersede_earlier_ones(data_dir):
    store, warned = make_store(data_dir)
    a, b = job("a1"), job("b1")
    store.append([a, b])
    a.text = "a2"
    store.append([a])
    a.text = "a3"
    a.metadata = {"k": 1}
    store.append([a])
    jobs = fresh_jobs(data_dir)
    assert set(jobs) == {a.local_id, b.local_id}
    assert jobs[a.local_id].text == "a3" and jobs[a.local_id].metadata == {"k": 1}
    assert jobs[b.local_id].text == "b1"
    assert warned == []


def test_a_purge_tombstone_removes_the_job(data_dir):
    store, _ = make_store(data_dir)
    a, b = job("a"), job("b")
    store.append([a, b])
    store.append(purge=[a.local_id])
    assert set(fresh_jobs(data_dir)) == {b.local_id}
    store.load()
    assert set(store.jobs) == {b.local_id}


def test_a_job_written_after_its_tombstone_is_live_again(data_dir):
    store, _ = make_store(data_dir)
    a = job("a")
    store.append([a])
    store.append(purge=[a.local_id])
    store.append([a])
    assert set(fresh_jobs(data_dir)) == {a.local_id}


def test_an_empty_or_missing_store_loads_as_no_jobs(data_dir):
    assert fresh_jobs(data_dir) == {}
    (data_dir / STORE_NAME).write_bytes(b"")
    assert fresh_jobs(data_dir) == {}


def test_every_line_of_the_store_is_a_json_object(data_dir):
    store, _ = make_store(data_dir)
    store.append([job("x\ny \u00e9 \"q\""), job(metadata={"a": [1, {"b": None}]})])
    for line in lines_of(data_dir / STORE_NAME):
        assert isinstance(json.loads(line), dict)


# ---- find ------------------------------------------------------------------------------------


def fixed_id(prefix: str) -> str:
    """A UUID4-shaped id starting with `prefix` (hex)."""
    rest = new_local_id()
    return prefix + rest[len(prefix):]


def test_find_by_exact_local_id(data_dir):
    store, _ = make_store(data_dir)
    a, b = job("a"), job("b")
    store.append([a, b])
    assert store.find(a.local_id).text == "a"
    assert store.find(b.local_id.upper()).text == "b"


def test_find_returns_the_latest_version(data_dir):
    store, _ = make_store(data_dir)
    a = job("old")
    store.append([a])
    a.text = "new"
    store.append([a])
    assert store.find(a.local_id).text == "new"
    assert store.find(a.local_id[:8]).text == "new"


def test_find_by_exact_server_id(data_dir):
    store, _ = make_store(data_dir)
    a, b = job("a", server_id="srv-1"), job("b", server_id="42")
    store.append([a, b])
    assert store.find("srv-1").local_id == a.local_id
    assert store.find("42").local_id == b.local_id


def test_find_by_server_id_sees_a_server_id_set_later(data_dir):
    store, _ = make_store(data_dir)
    a = job("a")
    store.append([a])
    with pytest.raises(NoSuchJob):
        store.find("srv-9")
    a.server_id = "srv-9"
    store.append([a])
    assert store.find("srv-9").local_id == a.local_id


def test_an_exact_local_id_wins_over_a_server_id(data_dir):
    store, _ = make_store(data_dir)
    a = job("a")
    b = job("b", server_id=a.local_id)
    store.append([a, b])
    assert store.find(a.local_id).text == "a"


def test_find_by_unique_prefix_of_six_characters_case_insensitive(data_dir):
    store, _ = make_store(data_dir)
    a = job("a", local_id=fixed_id("abcdef12"))
    b = job("b", local_id=fixed_id("abcdff12"))
    store.append([a, b])
    assert store.find("abcdef").local_id == a.local_id
    assert store.find("ABCDEF1").local_id == a.local_id
    assert store.find("abcdff").local_id == b.local_id


def test_a_prefix_shorter_than_six_characters_matches_nothing(data_dir):
    store, _ = make_store(data_dir)
    a = job("a", local_id=fixed_id("abcdef12"))
    store.append([a])
    with pytest.raises(NoSuchJob) as err:
        store.find("abcde")
    assert err.value.exit_code == 1
    assert "no job matches" in str(err.value)


def test_an_ambiguous_prefix_lists_the_matching_ids(data_dir):
    store, _ = make_store(data_dir)
    a = job("a", local_id=fixed_id("abcdef12"))
    b = job("b", local_id=fixed_id("abcdef34"))
    c = job("c", local_id=fixed_id("99cdef34"))
    store.append([a, b, c])
    with pytest.raises(NoSuchJob) as err:
        store.find("abcdef")
    assert a.local_id in str(err.value) and b.local_id in str(err.value)
    assert c.local_id not in str(err.value)
    assert store.find("abcdef3").local_id == b.local_id


def test_a_prefix_of_a_purged_job_does_not_make_a_match_ambiguous(data_dir):
    store, _ = make_store(data_dir)
    a = job("a", local_id=fixed_id("abcdef12"))
    b = job("b", local_id=fixed_id("abcdef34"))
    store.append([a, b])
    store.append(purge=[b.local_id])
    assert store.find("abcdef").local_id == a.local_id
    with pytest.raises(NoSuchJob):
        store.find(b.local_id)


def test_an_unknown_reference_matches_nothing(data_dir):
    store, _ = make_store(data_dir)
    store.append([job("a")])
    for ref in ["0123456789", "nope", "", 'a"b', "x\\y", fixed_id("123456")]:
        with pytest.raises(NoSuchJob):
            store.find(ref)


def test_metadata_holding_a_server_id_key_does_not_confuse_server_id_lookup(data_dir):
    store, _ = make_store(data_dir)
    decoy = job("decoy", metadata={"server_id": "S1", "x": 1})
    decoy2 = job("decoy2", metadata={"a": "b", "server_id": "S1", "c": 2})
    decoy3 = job('","server_id":"S1",', metadata={"nested": {"server_id": "S1"}})
    real = job("real", server_id="S1")
    store.append([decoy, decoy2, decoy3])
    with pytest.raises(NoSuchJob):
        store.find("S1")
    store.append([real])
    assert store.find("S1").local_id == real.local_id


def test_find_of_a_server_id_whose_job_now_has_another_one_matches_nothing(data_dir):
    store, _ = make_store(data_dir)
    a = job("a", server_id="old")
    store.append([a])
    a.server_id = "new"
    store.append([a])
    with pytest.raises(NoSuchJob):
        store.find("old")
    assert store.find("new").local_id == a.local_id


# ---- compaction ------------------------------------------------------------------------------


def test_compaction_keeps_only_live_records_and_shrinks_the_file(data_dir):
    store, _ = make_store(data_dir)
    jobs = [job(f"j{i}") for i in range(20)]
    store.append(jobs)
    for rnd in range(5):
        for j in jobs:
            j.text = f"{j.local_id}-{rnd}"
        store.append(jobs)
    store.append(purge=[j.local_id for j in jobs[:5]])
    path = data_dir / STORE_NAME
    size_before = path.stat().st_size
    expected = fresh_jobs(data_dir)
    before, after = Store(str(data_dir)).compact()
    assert (before, after) == (20 * 6 + 5, 15)
    assert path.stat().st_size < size_before
    assert len(lines_of(path)) == 15
    got = fresh_jobs(data_dir)
    assert {k: v.record() for k, v in got.items()} == {k: v.record() for k, v in expected.items()}
    assert not (data_dir / TMP_NAME).exists()


def test_compaction_of_an_empty_store_leaves_an_empty_file(data_dir):
    store, _ = make_store(data_dir)
    a = job()
    store.append([a])
    store.append(purge=[a.local_id])
    assert Store(str(data_dir)).compact() == (2, 0)
    assert (data_dir / STORE_NAME).read_bytes() == b""


def test_a_loaded_store_compacts_itself_when_dead_records_outweigh_live_ones(data_dir):
    store, _ = make_store(data_dir)
    store.load()
    jobs = [job(f"j{i}") for i in range(50)]
    store.append(jobs)
    path = data_dir / STORE_NAME
    max_lines = 0
    for rnd in range(6):
        for j in jobs:
            j.text = f"r{rnd}"
            store.append([j])
            max_lines = max(max_lines, len(lines_of(path)))
    # Without compaction there would be 350 lines.
    assert max_lines <= max(AUTO_COMPACT_MIN_LINES, 2 * 50 + 1)
    assert len(lines_of(path)) < AUTO_COMPACT_MIN_LINES
    got = fresh_jobs(data_dir)
    assert set(got) == {j.local_id for j in jobs}
    assert all(j.text == "r5" for j in got.values())


# ---- torn and corrupt lines -----------------------------------------------------------------


def torn_store(data_dir: Path) -> tuple[list[Job], bytes]:
    store, _ = make_store(data_dir)
    jobs = [job(f"j{i}") for i in range(5)]
    store.append(jobs)
    partial = json.dumps(job("torn").record()).encode()[:40]
    with open(data_dir / STORE_NAME, "ab") as fh:
        fh.write(partial)
    return jobs, partial


def test_a_torn_last_line_is_skipped_with_a_warning(data_dir):
    jobs, _ = torn_store(data_dir)
    store, warned = make_store(data_dir)
    got = store.load()
    assert set(got) == {j.local_id for j in jobs}
    assert len(warned) == 1 and "incomplete" in warned[0]


@pytest.mark.parametrize("loaded", [True, False])
def test_a_torn_last_line_is_repaired_on_the_next_append(data_dir, loaded):
    jobs, partial = torn_store(data_dir)
    store, warned = make_store(data_dir)
    if loaded:
        store.load()
    new = job("after")
    store.append([new])
    raw = (data_dir / STORE_NAME).read_bytes()
    assert partial not in raw
    assert raw.endswith(b"\n")
    for line in lines_of(data_dir / STORE_NAME):
        json.loads(line)
    again, warned_again = make_store(data_dir)
    assert set(again.load()) == {j.local_id for j in jobs} | {new.local_id}
    assert warned_again == []


def test_a_complete_but_unparseable_last_line_is_skipped_and_repaired_by_a_loaded_store(data_dir):
    store, _ = make_store(data_dir)
    jobs = [job(f"j{i}") for i in range(3)]
    store.append(jobs)
    with open(data_dir / STORE_NAME, "ab") as fh:
        fh.write(b'{"local_id": "trunc\n')
    loaded, warned = make_store(data_dir)
    assert set(loaded.load()) == {j.local_id for j in jobs}
    assert warned
    new = job("new")
    loaded.append([new])
    assert b"trunc" not in (data_dir / STORE_NAME).read_bytes()
    again, warned_again = make_store(data_dir)
    assert set(again.load()) == {j.local_id for j in jobs} | {new.local_id}
    assert warned_again == []


def corrupt_middle(data_dir: Path) -> tuple[list[Job], bytes]:
    store, _ = make_store(data_dir)
    first = [job(f"a{i}") for i in range(3)]
    second = [job(f"b{i}") for i in range(3)]
    store.append(first)
    garbage = b'{"local_id": oops this is not json'
    # Written raw, as a disk error would leave it: a store write would repair an unreadable
    # last line before appending, so the garbage would never end up in the middle.
    with open(data_dir / STORE_NAME, "ab") as fh:
        fh.write(garbage + b"\n" + b"".join(encode_record(j.record()) for j in second))
    return first + second, garbage


def test_an_unparseable_middle_line_is_copied_aside_and_the_rest_loads(data_dir):
    jobs, garbage = corrupt_middle(data_dir)
    store, warned = make_store(data_dir)
    assert set(store.load()) == {j.local_id for j in jobs}
    asides = sorted(data_dir.glob(STORE_NAME + ".corrupt-*"))
    assert len(asides) == 1
    assert asides[0].read_bytes().strip() == garbage
    assert stat.S_IMODE(asides[0].stat().st_mode) == 0o600
    assert len(warned) == 1 and str(asides[0]) in warned[0]


def test_an_unparseable_middle_line_is_copied_aside_only_once(data_dir):
    corrupt_middle(data_dir)
    for _ in range(3):
        fresh_jobs(data_dir)
    assert len(list(data_dir.glob(STORE_NAME + ".corrupt-*"))) == 1


def test_an_unparseable_middle_line_is_dropped_at_the_next_write_of_a_loaded_store(data_dir):
    jobs, garbage = corrupt_middle(data_dir)
    store, _ = make_store(data_dir)
    store.load()
    new = job("new")
    store.append([new])
    assert garbage not in (data_dir / STORE_NAME).read_bytes()
    again, warned = make_store(data_dir)
    assert set(again.load()) == {j.local_id for j in jobs} | {new.local_id}
    assert warned == []
    assert len(list(data_dir.glob(STORE_NAME + ".corrupt-*"))) == 1


def test_a_valid_json_line_that_is_not_a_job_is_treated_as_corrupt(data_dir):
    store, _ = make_store(data_dir)
    a = job("a")
    store.append([a])
    with open(data_dir / STORE_NAME, "ab") as fh:
        fh.write(b'[1, 2, 3]\n{"local_id": "x", "sync_status": "bogus"}\n')
    b = job("b")
    store.append([b])
    loaded, warned = make_store(data_dir)
    assert set(loaded.load()) == {a.local_id, b.local_id}
    assert len(list(data_dir.glob(STORE_NAME + ".corrupt-*"))) == 2


# ---- refresh across stores and processes ----------------------------------------------------


def test_refresh_sees_what_another_store_appended(data_dir):
    a_store, _ = make_store(data_dir)
    b_store, _ = make_store(data_dir)
    a_store.load()
    j = job("from b")
    b_store.append([j])
    assert a_store.refresh()[j.local_id].text == "from b"
    j.text = "changed"
    b_store.append([j])
    b_store.append(purge=[])
    assert a_store.refresh()[j.local_id].text == "changed"
    b_store.append(purge=[j.local_id])
    assert j.local_id not in a_store.refresh()


def test_refresh_sees_what_another_process_appended(data_dir):
    a_store, _ = make_store(data_dir)
    a_store.load()
    code = (
        "import sys; from jobsyncd.store import Store; from jobsyncd.model import Job;"
        "Store(sys.argv[1]).append([Job(local_id=sys.argv[2], text='other process')])"
    )
    lid = new_local_id()
    subprocess.run([sys.executable, "-c", code, str(data_dir), lid], check=True, timeout=30)
    assert a_store.refresh()[lid].text == "other process"


def test_refresh_survives_compactions_by_another_store(data_dir):
    a_store, _ = make_store(data_dir)
    b_store, _ = make_store(data_dir)
    live = {j.local_id: j for j in (job(f"j{i}") for i in range(30))}
    b_store.append(live.values())
    a_store.load()
    for rnd in range(4):
        for j in live.values():
            j.text = f"r{rnd}"
        b_store.append(live.values())
        gone = next(iter(live))
        b_store.append(purge=[gone])
        del live[gone]
        b_store.compact()
        if rnd % 2:
            extra = job(f"extra{rnd}")
            b_store.append([extra])
            live[extra.local_id] = extra
        got = a_store.refresh()
        assert {k: v.text for k, v in got.items()} == {k: v.text for k, v in live.items()}, rnd


def test_refresh_survives_two_compactions_by_another_store_between_looks(data_dir):
    """A compaction frees the old file's inode; a second one may get that inode number back
    (ext4 reuses them), so a store that only compares inode numbers reads the new file from a
    stale offset."""
    a_store, a_warned = make_store(data_dir)
    b_store, _ = make_store(data_dir)
    jobs = [job(f"j{i}") for i in range(10)]
    b_store.append(jobs)
    a_store.load()
    b_store.append(purge=[jobs[0].local_id])
    b_store.compact()
    b_store.compact()
    new = [job(f"new{i}") for i in range(3)]
    b_store.append(new)
    expected = {j.local_id for j in jobs[1:] + new}
    assert set(a_store.refresh()) == expected
    assert a_warned == []
    assert list(data_dir.glob(STORE_NAME + ".corrupt-*")) == []
    # And a write by that store afterwards loses nothing and resurrects nothing.
    last = job("last")
    a_store.append([last])
    assert set(fresh_jobs(data_dir)) == expected | {last.local_id}


def test_a_store_compacted_by_another_process_then_appended_to_loses_nothing(data_dir):
    a_store, _ = make_store(data_dir)
    jobs = [job(f"j{i}") for i in range(10)]
    a_store.append(jobs)
    a_store.load()
    for j in jobs:
        j.text = "v2"
    Store(str(data_dir)).append(jobs)
    subprocess.run(
        [sys.executable, "-c", "import sys; from jobsyncd.store import Store; Store(sys.argv[1]).compact()", str(data_dir)],
        check=True,
        timeout=30,
    )
    new = job("new")
    a_store.append([new])
    assert {k: v.text for k, v in a_store.jobs.items()} == {j.local_id: "v2" for j in jobs} | {new.local_id: "new"}
    assert {k: v.text for k, v in fresh_jobs(data_dir).items()} == {j.local_id: "v2" for j in jobs} | {new.local_id: "new"}


# ---- permissions -----------------------------------------------------------------------------


def test_the_data_dir_is_0700_and_the_store_files_0600(tmp_path):
    os.umask(0o022)
    d = tmp_path / "data"
    prepare_data_dir(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    os.umask(0o000)  # even a careless umask does not open the files up
    store = Store(str(d))
    store.load()
    store.append([job("a")])
    assert stat.S_IMODE((d / STORE_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((d / LOCK_NAME).stat().st_mode) == 0o600
    store.compact()
    assert stat.S_IMODE((d / STORE_NAME).stat().st_mode) == 0o600


def test_an_existing_open_data_dir_is_made_private(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    os.chmod(d, 0o755)
    prepare_data_dir(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_prepare_data_dir_creates_missing_parents(tmp_path):
    d = tmp_path / "a" / "b" / "data"
    prepare_data_dir(str(d))
    assert d.is_dir()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_a_data_dir_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 12345)
    with pytest.raises(JobsyncdError) as err:
        prepare_data_dir(str(d))
    assert "another user" in str(err.value)
    assert err.value.exit_code == 1


def test_a_data_dir_under_a_regular_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(JobsyncdError) as err:
        prepare_data_dir(str(tmp_path / "file" / "data"))
    assert "data dir" in str(err.value)


def test_a_data_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(JobsyncdError):
        prepare_data_dir(str(tmp_path / "file"))


# ---- symlinks and odd files ------------------------------------------------------------------


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_text("precious\n")
    os.chmod(v, 0o644)
    return v


def assert_untouched(victim: Path) -> None:
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_a_symlink_planted_at_the_store_is_refused(data_dir, victim):
    (data_dir / STORE_NAME).symlink_to(victim)
    store, _ = make_store(data_dir)
    with pytest.raises(SymlinkRefused) as err:
        store.load()
    assert str(data_dir / STORE_NAME) in str(err.value)
    with pytest.raises(SymlinkRefused):
        store.append([job("x")])
    with pytest.raises(SymlinkRefused):
        store.find("abcdef")
    with pytest.raises(SymlinkRefused):
        store.compact()
    assert_untouched(victim)
    assert (data_dir / STORE_NAME).is_symlink()


def test_a_dangling_symlink_planted_at_the_store_is_refused_and_creates_nothing(data_dir, tmp_path):
    target = tmp_path / "created-through-link"
    (data_dir / STORE_NAME).symlink_to(target)
    with pytest.raises(SymlinkRefused):
        Store(str(data_dir)).append([job("x")])
    assert not target.exists()


def test_a_symlink_planted_at_the_lock_is_refused(data_dir, victim, tmp_path):
    (data_dir / LOCK_NAME).symlink_to(victim)
    with pytest.raises(SymlinkRefused) as err:
        Store(str(data_dir)).append([job("x")])
    assert str(data_dir / LOCK_NAME) in str(err.value)
    with pytest.raises(SymlinkRefused):
        Store(str(data_dir)).load()
    assert_untouched(victim)
    (data_dir / LOCK_NAME).unlink()
    (data_dir / LOCK_NAME).symlink_to(tmp_path / "dangling-lock")
    with pytest.raises(SymlinkRefused):
        Store(str(data_dir)).append([job("x")])
    assert not (tmp_path / "dangling-lock").exists()


def test_a_symlink_planted_at_the_temporary_file_is_refused(data_dir, victim):
    store, _ = make_store(data_dir)
    a = job("a")
    store.append([a])
    (data_dir / TMP_NAME).symlink_to(victim)
    with pytest.raises(SymlinkRefused) as err:
        Store(str(data_dir)).compact()
    assert str(data_dir / TMP_NAME) in str(err.value)
    assert_untouched(victim)
    assert set(fresh_jobs(data_dir)) == {a.local_id}


def test_a_leftover_temporary_file_from_a_crash_does_not_stop_compaction(data_dir):
    store, _ = make_store(data_dir)
    a = job("a")
    store.append([a])
    (data_dir / TMP_NAME).write_bytes(b"half a compaction")
    Store(str(data_dir)).compact()
    assert set(fresh_jobs(data_dir)) == {a.local_id}
    assert not (data_dir / TMP_NAME).exists()


def test_a_store_replaced_by_a_directory_gives_a_clear_error(data_dir):
    (data_dir / STORE_NAME).mkdir()
    store, _ = make_store(data_dir)
    with pytest.raises(JobsyncdError) as err:
        store.load()
    assert str(data_dir / STORE_NAME) in str(err.value)
    with pytest.raises(JobsyncdError) as err:
        Store(str(data_dir)).append([job("x")])
    assert str(data_dir / STORE_NAME) in str(err.value)


# ---- concurrency and crashes -----------------------------------------------------------------


WORKER = """
import sys
from jobsyncd.cli import main
worker = sys.argv[1]
for i in range(int(sys.argv[2])):
    try:
        main(["create", "--text", f"w{worker}-{i}", "--meta", f"i={i}"])
    except SystemExit as exc:
        if exc.code:
            raise
"""


def check_intact(data_dir: Path, expected_texts: set[str]) -> dict[str, Job]:
    for line in lines_of(data_dir / STORE_NAME):
        assert isinstance(json.loads(line), dict)
    jobs, warned = make_store(data_dir)
    got = jobs.load()
    assert warned == []
    assert sorted(j.text for j in got.values()) == sorted(expected_texts)
    return got


@pytest.mark.timeout(60)
def test_eight_processes_creating_fifty_jobs_each_at_once_give_400_intact_jobs(cli):
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(w), "50"], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(8)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=45)
            assert p.returncode == 0, err
            assert err == ""
            outputs += out.split()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    expected = {f"w{w}-{i}" for w in range(8) for i in range(50)}
    got = check_intact(cli.data_dir, expected)
    assert len(got) == 400
    assert sorted(outputs) == sorted(got)


@pytest.mark.timeout(60)
def test_eight_installed_jobsyncd_create_commands_at_once_lose_nothing(cli):
    script = 'for i in 0 1 2; do "$0" create --text "w$1-$i" || exit 1; done'
    procs = [
        subprocess.Popen(["sh", "-c", script, cli.binary, str(w)], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(8)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=45)
            assert p.returncode == 0, err
            assert err == ""
            outputs += out.split()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    got = check_intact(cli.data_dir, {f"w{w}-{i}" for w in range(8) for i in range(3)})
    assert sorted(outputs) == sorted(got)


COMPACTOR = """
import sys
from jobsyncd.store import Store
store = Store(sys.argv[1])
store.load()
print("ready", flush=True)
while True:
    store.compact()
    print("compacted", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_process_killed_in_the_middle_of_a_compaction_loses_no_job(data_dir):
    store, _ = make_store(data_dir)
    jobs = [job(f"j{i}", metadata={"i": i}) for i in range(50_000)]
    store.append(jobs)
    # Some dead records so that every compaction really rewrites the file.
    store.append(jobs[:1000])
    expected = {j.local_id for j in jobs}
    rng = random.Random(7)
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", COMPACTOR, str(data_dir)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            if attempt % 2:
                assert proc.stdout.readline().strip() == "compacted"
            deadline = time.monotonic() + rng.uniform(0.0, 1.2)
            poll(lambda d=deadline: time.monotonic() >= d, timeout=5, interval=0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        fresh, warned = make_store(data_dir)
        got = fresh.load()
        assert set(got) == expected, f"after kill {attempt}"
        assert warned == []
    # And the store is still usable: a write and a compaction work after the crashes.
    extra = job("after the crashes")
    Store(str(data_dir)).append([extra])
    Store(str(data_dir)).compact()
    assert set(fresh_jobs(data_dir)) == expected | {extra.local_id}
    assert not (data_dir / TMP_NAME).exists()


# ---- the no-change pass's quick look -----------------------------------------------------------


def test_a_store_of_synced_jobs_holds_no_due_jobs_even_with_stale_pending_lines(data_dir):
    store, _ = make_store(data_dir)
    jobs = [job(f"j{i}") for i in range(5)]
    store.append(jobs)  # pending lines
    for j in jobs:
        j.sync_status = "synced"
        j.server_id = f"s-{j.local_id[:8]}"
    store.append(jobs)  # each superseded by a synced line
    assert Store(str(data_dir)).may_hold_due_jobs() is False


@pytest.mark.parametrize("status", ["pending", "pending_deletion", "error"])
def test_a_job_whose_last_line_needs_a_push_is_seen_without_folding(data_dir, status):
    store, _ = make_store(data_dir)
    done = job("done", sync_status="synced", server_id="s1")
    due = job("due", sync_status="synced", server_id="s2")
    store.append([done, due])
    due.sync_status = status
    store.append([due])
    assert Store(str(data_dir)).may_hold_due_jobs() is True


def test_an_empty_or_missing_store_holds_no_due_jobs(data_dir):
    prepare_data_dir(str(data_dir))
    assert Store(str(data_dir)).may_hold_due_jobs() is False
    (data_dir / STORE_NAME).write_bytes(b"")
    assert Store(str(data_dir)).may_hold_due_jobs() is False


def test_jobs_a_loaded_store_adopts_are_the_jobs_a_fresh_load_reads_back(data_dir: Path) -> None:
    store, _ = make_store(data_dir)
    kept, gone = job("kept"), job("gone")
    store.append([kept, gone])
    store.load()
    synced = job("synced", local_id=kept.local_id, sync_status="synced", server_id="s1", rev=2)
    synced.metadata = {"k": ["ü", 1.5, None]}
    synced.base = {"text": "synced", "metadata": {"k": ["ü", 1.5, None]}}
    synced.server_status = "".join(["sub", "mitted"])  # not the interned string
    synced.upload_for, synced.upload_offset = "left over", 7  # no upload_url: not written
    other = job("other", base={"text": "older", "metadata": {}}, create_sent=1)
    store.append([synced, other], [gone.local_id], adopt=True)
    fresh, _ = make_store(data_dir)
    assert {k: j.record() for k, j in store.jobs.items()} == {
        k: j.record() for k, j in fresh.load().items()
    }
    for local_id, loaded in fresh.jobs.items():
        adopted = store.jobs[local_id]
        for name in Job.__slots__:
            assert getattr(adopted, name) == getattr(loaded, name), name
    assert store.jobs[kept.local_id] is synced
    assert type(synced._base) is tuple and synced._base[1] is synced.metadata
    assert synced.server_status is sys.intern("submitted")


def test_blank_lines_and_crlf_endings_between_records_still_load_every_job(data_dir: Path) -> None:
    store, warned = make_store(data_dir)
    jobs = [job(f"j{i}") for i in range(5)]
    store.append(jobs)
    path = data_dir / STORE_NAME
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n\n".join(lines[:2]) + b"\r\n \n" + b"\n".join(lines[2:]))
    fresh, _ = make_store(data_dir)
    assert sorted(fresh.load()) == sorted(j.local_id for j in jobs)
    assert not warned
