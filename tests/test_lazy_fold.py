"""The lazy fold (store.CHECKED_NAME, jobtable.py): a sync pass keeps the lines an earlier fold
checked as raw lines and parses them only when a job is asked for. Whatever it holds, every
question asked of it must get the answer an eager fold gives."""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import pytest
from test_store import Warnings, job

from jobsyncd.checked import INDEX_NAME, MAX_CHUNKS, encode_chunk
from jobsyncd.jobtable import Entries, JobTable, LazyDict, index_lines
from jobsyncd.model import Job, new_local_id
from jobsyncd.store import CHECKED_NAME, STORE_NAME, Store, prepare_data_dir
from jobsyncd.storeformat import DUE_NEEDLES


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    prepare_data_dir(str(d))
    return d


def store_of(data_dir: Path, lazy: bool = True) -> tuple[Store, Warnings]:
    warned = Warnings()
    store = Store(str(data_dir), warn=warned)
    store.fold_lazily = lazy
    return store, warned


def hold_lines(table: JobTable, data: bytes) -> int:
    """`table` holding the whole lines `data` as checked lines from a store's start."""
    entries = index_lines(data)
    assert entries is not None
    return table.hold(data, entries)


def varied_jobs() -> list[Job]:
    """Jobs whose lines try the byte reader: every status, server ids with escapes, metadata and
    bases that name "sync_status" and "server_id" themselves, non-ASCII text."""
    return [
        job("plain pending"),
        job("synced", server_id="s-1", sync_status="synced", base={"text": "old", "metadata": {}}),
        job("synced same base", server_id="s-2", sync_status="synced", rev=3),
        job("erred", server_id="s-3", sync_status="error", retry_count=2, error_kind="gone"),
        job("failed", sync_status="failed", last_error="no"),
        job("deleting", server_id="s-4", sync_status="pending_deletion"),
        job("quote in id", server_id='s-"5"\\x', sync_status="synced"),
        job("unicode ü 日本", server_id="s-ü", sync_status="synced"),
        job("meta names status", server_id="s-6", sync_status="synced",
            metadata={"sync_status": "pending", "server_id": "s-1"}),
        job("base names status", server_id="s-7", sync_status="pending",
            base={"text": "t", "metadata": {"sync_status": "synced"}}),
        job("pending in text: \"sync_status\":\"pending\"", server_id="s-8", sync_status="synced"),
    ]


def records(jobs) -> dict[str, dict]:
    return {local_id: j.record() for local_id, j in jobs.items()}


def checked_store(data_dir: Path, jobs: list[Job]) -> None:
    """A store holding `jobs`, compacted (which leaves CHECKED_NAME: its lines are as this
    version writes them)."""
    writer, warned = store_of(data_dir, lazy=False)
    writer.append(jobs)
    writer.compact()
    assert not warned
    assert (data_dir / CHECKED_NAME).exists()


def test_a_lazy_fold_holds_the_checked_lines_raw_and_answers_as_an_eager_fold(data_dir):
    jobs = varied_jobs()
    checked_store(data_dir, jobs)
    lazy, warned = store_of(data_dir)
    table = lazy.load()
    assert table.raw_count == len(jobs)  # nothing parsed yet
    eager, _ = store_of(data_dir, lazy=False)
    expected = eager.load()
    assert sorted(table) == sorted(expected)
    assert len(table) == len(expected)
    summaries = {lid: (sid, status) for lid, sid, status in table.summaries()}
    assert summaries == {lid: (j.server_id, j.sync_status) for lid, j in expected.items()}
    due = {j.local_id for j in table.may_be_due()}
    needing_a_push = ("pending", "pending_deletion", "error")
    assert due >= {j.local_id for j in jobs if j.sync_status in needing_a_push}
    assert records(table) == records(expected)  # values() parses the rest
    assert table.raw_count == 0
    assert not warned


def test_may_be_due_leaves_the_lines_of_synced_and_failed_jobs_unparsed(data_dir):
    synced = [job(f"s{i}", server_id=f"id-{i}", sync_status="synced") for i in range(20)]
    pending = job("new")
    checked_store(data_dir, [*synced, job("gave up", sync_status="failed"), pending])
    store, _ = store_of(data_dir)
    table = store.load()
    assert [j.local_id for j in table.may_be_due()] == [pending.local_id]
    assert table.raw_count == 21


def test_lines_appended_after_the_checked_ones_are_parsed_and_win(data_dir):
    kept, edited, gone = job("kept"), job("before"), job("to purge")
    checked_store(data_dir, [kept, edited, gone])
    other, _ = store_of(data_dir, lazy=False)  # another process (a CLI command) appends
    edited.text = "after"
    other.append([edited], purge=[gone.local_id])
    store, warned = store_of(data_dir)
    table = store.load()
    assert set(table) == {kept.local_id, edited.local_id}
    assert table.raw_count == 1  # `kept`; `edited` was parsed from its new line
    assert table[edited.local_id].text == "after"
    assert not warned


def test_a_corrupt_line_appended_after_the_checked_ones_is_set_aside_as_in_any_fold(data_dir):
    a, b = job("a"), job("b")
    checked_store(data_dir, [a])
    with open(data_dir / STORE_NAME, "ab") as f:  # a corrupt line, then another job's
        f.write(b'{"local_id": broken\n' + b.record_json().encode() + b"\n")
    store, warned = store_of(data_dir)
    assert set(store.load()) == {a.local_id, b.local_id}
    assert any("copied to" in w for w in warned)


def test_a_byte_changed_in_place_inside_the_checked_lines_makes_a_full_fold(data_dir):
    a, b = job("aaaa"), job("bbbb")
    checked_store(data_dir, [a, b])
    path = data_dir / STORE_NAME
    data = path.read_bytes()
    with open(path, "r+b") as f:  # same inode, same size: only the CRC tells
        f.seek(data.index(b'"aaaa"'))
        f.write(b'"aaaa\\')  # now a line that does not parse
    store, warned = store_of(data_dir)
    table = store.load()
    assert table.raw_count == 0
    assert set(table) == {b.local_id}
    assert any("unreadable line" in w for w in warned)


def test_a_changed_text_in_place_is_read_as_it_is_now(data_dir):
    a = job("aaaa")
    checked_store(data_dir, [a])
    path = data_dir / STORE_NAME
    path.write_bytes(path.read_bytes().replace(b'"aaaa"', b'"zzzz"'))
    store, _ = store_of(data_dir)
    assert store.load()[a.local_id].text == "zzzz"


@pytest.mark.parametrize(
    "record",
    [
        b"",
        b"{torn",
        b'{"format": 0, "version": "0.1.0", "dev": 1, "ino": 1, "end": 1, "crc": 1}',
        b'{"format": 1, "version": "0.0.0-other", "dev": 1, "ino": 1, "end": 1, "crc": 1}',
        b"[1, 2, 3]",
    ],
)
def test_a_checked_record_that_is_torn_or_not_ours_is_ignored(data_dir, record):
    a = job("a")
    checked_store(data_dir, [a])
    saved = json.loads((data_dir / CHECKED_NAME).read_bytes())
    if record.startswith(b'{"format"'):
        mine = json.loads(record)
        mine = {**saved, "format": mine["format"], "version": mine["version"]}
        record = json.dumps(mine).encode()
    (data_dir / CHECKED_NAME).write_bytes(record)
    store, warned = store_of(data_dir)
    table = store.load()
    assert table.raw_count == 0 and set(table) == {a.local_id}
    assert not warned


def test_a_checked_record_of_another_file_is_ignored(data_dir):
    a = job("a")
    checked_store(data_dir, [a])
    saved = (data_dir / CHECKED_NAME).read_bytes()
    path = data_dir / STORE_NAME
    replacement = data_dir / "other"
    replacement.write_bytes(path.read_bytes())
    os.replace(replacement, path)  # same bytes, another inode
    (data_dir / CHECKED_NAME).write_bytes(saved)
    store, _ = store_of(data_dir)
    assert store.load().raw_count == 0


def test_a_store_shorter_than_its_checked_lines_is_folded_whole(data_dir):
    a, b = job("a"), job("b")
    checked_store(data_dir, [a, b])
    path = data_dir / STORE_NAME
    first_line = path.read_bytes().split(b"\n")[0] + b"\n"
    with open(path, "r+b") as f:
        f.truncate(len(first_line))
    store, _ = store_of(data_dir)
    table = store.load()
    assert table.raw_count == 0 and set(table) == {a.local_id}


def test_a_store_never_compacted_by_this_version_is_folded_eagerly_and_gets_no_record(data_dir):
    a = job("a")
    path = data_dir / STORE_NAME
    # A line written by another tool with its keys in another order: valid, not our layout.
    rec = a.record()
    path.write_bytes((json.dumps(dict(reversed(list(rec.items())))) + "\n").encode())
    os.chmod(path, 0o600)
    for _ in range(2):
        store, warned = store_of(data_dir)
        table = store.load()
        store.compact_if_worth_it()
        assert table.raw_count == 0 and table[a.local_id].text == "a"
        assert not warned
        assert not (data_dir / CHECKED_NAME).exists()


def append_lines(data_dir: Path, lines: list[bytes]) -> None:
    with open(data_dir / STORE_NAME, "ab") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def both_folds(data_dir: Path):
    """A lazy fold (after a first one that checked what it could), and an eager one."""
    first, warned = store_of(data_dir)
    first.load()
    first.compact_if_worth_it()  # a pass's end: saves what is checked
    assert not warned, warned
    lazy, lazy_warned = store_of(data_dir)
    table = lazy.load()
    eager, _ = store_of(data_dir, lazy=False)
    return lazy, table, eager.load(), lazy_warned


def rewritten(j: Job, old: bytes, new: bytes) -> bytes:
    line = j.record_json().encode()
    assert old in line
    return line.replace(old, new, 1)


# Lines another writer could leave (valid records, not as this version writes them): they are
# parsed by every fold, never held raw, so the bytes are never misread.
@pytest.mark.parametrize(
    "tomb",
    [
        b'{"local_id":"%s","purged":true,"by":"cli"}',  # an extra key
        b'{"local_id":"%s","purged": true}',  # a space
        b'{"local_id":"%s","server_id":null,"purged":true}',  # purged not second
    ],
)
def test_a_tombstone_of_another_form_keeps_its_job_purged(data_dir, tomb):
    gone = job("to purge", sync_status="synced", server_id="S1")
    checked_store(data_dir, [job("usual")])
    append_lines(data_dir, [gone.record_json().encode(), tomb % gone.local_id.encode()])
    lazy, table, expected, _ = both_folds(data_dir)
    assert gone.local_id not in expected and gone.local_id not in table
    assert gone.local_id not in [j.local_id for j in table.may_be_due()]
    lazy._rewrite()
    after, _ = store_of(data_dir, lazy=False)
    assert gone.local_id not in after.load()


@pytest.mark.parametrize(
    ("local_id", "server_id"),
    [("abcdefghijkl", None), ("abcdefghijklmnopqrstuv", "srv-1")],
)
def test_short_ids_whose_line_has_a_quote_at_the_id_end_are_found_under_their_own_id(
    data_dir, local_id, server_id
):
    odd = job("odd", server_id=server_id, sync_status="synced" if server_id else "pending")
    odd.local_id = local_id
    checked_store(data_dir, [job("usual")])
    append_lines(data_dir, [odd.record_json().encode()])
    lazy, table, expected, _ = both_folds(data_dir)
    assert local_id in expected
    assert sorted(table) == sorted(expected)


@pytest.mark.parametrize(
    ("status", "old", "new"),
    [
        ("pending", b'"sync_status":"pending"', b'"sync_status": "pending"'),
        ("synced", b'"sync_status":"synced"', b'"sync_status":"s\\u0079nced"'),
        ("synced", b'"text":', b'"server_id":"NEW","text":'),  # a second server_id key
    ],
)
def test_lines_of_another_writer_are_read_as_an_eager_fold_reads_them(data_dir, status, old, new):
    a = job("a", server_id="S", sync_status=status)
    checked_store(data_dir, [job("usual", server_id="U", sync_status="synced")])
    append_lines(data_dir, [rewritten(a, old, new)])
    lazy, table, expected, _ = both_folds(data_dir)
    assert sorted(table.summaries()) == sorted(expected.summaries())
    due = {j.local_id for j in table.may_be_due() if j.sync_status == "pending"}
    assert due == {j.local_id for j in expected.values() if j.sync_status == "pending"}


def test_a_second_local_id_key_is_keyed_as_json_reads_it(data_dir):
    a = job("a")
    other = new_local_id()
    checked_store(data_dir, [job("usual")])
    append_lines(data_dir, [rewritten(a, b'"text":', b'"local_id":"%s","text":' % other.encode())])
    lazy, table, expected, _ = both_folds(data_dir)
    assert other in expected and sorted(table) == sorted(expected)


def test_a_binding_another_process_appends_during_a_pass_is_repaired_by_the_next_fold(data_dir):
    holder = job("holder", server_id="S", sync_status="synced")
    other = job("other")
    checked_store(data_dir, [holder, other])
    pass1, _ = store_of(data_dir)
    pass1.load()
    dup = other.clone()
    dup.server_id, dup.sync_status = "S", "pending"  # written by another process meanwhile
    Store(str(data_dir)).append([dup])
    pass1.refresh()  # must not take that line into the checked range
    pass1.compact_if_worth_it()
    lazy, warned = store_of(data_dir)
    bound = [lid for lid, sid, _ in lazy.load().summaries() if sid == "S"]
    assert len(bound) == 1
    assert any("bound to 2 local jobs" in w for w in warned)


def test_a_broken_raw_line_after_many_single_parses_is_a_clear_error():
    from jobsyncd.errors import JobsyncdError

    table = JobTable()
    forgot = []
    table.on_broken = lambda: forgot.append(1)
    jobs = [job(str(i)) for i in range(2100)]
    bad = jobs[-1].local_id
    lines = [j.record_json().encode() for j in jobs[:-1]]
    lines.append(b'{"local_id":"' + bad.encode() + b'","server_id":nul')
    assert hold_lines(table, b"\n".join(lines) + b"\n") == len(jobs)
    for j in jobs[:2001]:  # a pass that has read 2,001 jobs one by one
        table[j.local_id]
    with pytest.raises(JobsyncdError, match="no longer parses"):
        table[bad]
    assert forgot


def test_a_new_line_binding_a_server_id_a_raw_job_holds_is_repaired(data_dir):
    holder = job("holder", server_id="S", sync_status="synced")
    other = job("other")
    checked_store(data_dir, [holder, other])
    other.server_id, other.sync_status = "S", "pending"  # written by an old jobsyncd, say
    Store(str(data_dir)).append([other])
    store, warned = store_of(data_dir)
    table = store.load()
    assert [w for w in warned if "was bound to 2 local jobs" in w]
    bound = [lid for lid, sid, _ in table.summaries() if sid == "S"]
    assert len(bound) == 1


def test_compaction_of_a_lazy_fold_writes_what_an_eager_one_writes(data_dir, tmp_path):
    jobs = varied_jobs()
    checked_store(data_dir, jobs)
    Store(str(data_dir)).append([jobs[0]])  # a dead line to drop
    twin = tmp_path / "twin"
    prepare_data_dir(str(twin))
    (twin / STORE_NAME).write_bytes((data_dir / STORE_NAME).read_bytes())
    lazy, _ = store_of(data_dir)
    lazy.load()
    assert lazy.jobs.raw_count
    lazy.compact_if_worth_it()
    lazy._rewrite()
    eager, _ = store_of(twin, lazy=False)
    eager.compact()
    assert sorted((data_dir / STORE_NAME).read_bytes().split(b"\n")) == sorted(
        (twin / STORE_NAME).read_bytes().split(b"\n")
    )
    # And the compacted file is checked whole: the next lazy fold parses nothing.
    again, _ = store_of(data_dir)
    assert again.load().raw_count == len(jobs)


def test_what_a_loaded_lazy_store_appends_stays_checked_for_the_next_fold(data_dir):
    a, b = job("a"), job("b")
    checked_store(data_dir, [a])
    store, _ = store_of(data_dir)
    store.load()
    store.append([b], compact=False)
    store.compact_if_worth_it()  # the end of a pass: saves what is checked
    saved = json.loads((data_dir / CHECKED_NAME).read_bytes())
    assert saved["end"] == (data_dir / STORE_NAME).stat().st_size
    again, _ = store_of(data_dir)
    assert again.load().raw_count == 2


def test_a_snapshot_answers_as_the_table_was_when_taken(data_dir):
    a = job("a", server_id="s-a", sync_status="synced")
    checked_store(data_dir, [a])
    store, _ = store_of(data_dir)
    table = store.load()
    snapshot = table.snapshot()
    changed = table[a.local_id].clone()
    changed.sync_status = "pending"
    changed.server_id = "s-b"
    table[a.local_id] = changed
    assert list(snapshot.summaries()) == [(a.local_id, "s-a", "synced")]
    assert list(table.summaries()) == [(a.local_id, "s-b", "pending")]


def test_a_snapshot_of_a_table_of_parsed_jobs_keeps_only_their_ids_and_statuses():
    table = JobTable()
    bound = job("b", server_id="s", sync_status="synced")
    table[bound.local_id] = bound
    unbound = job("u")
    table[unbound.local_id] = unbound
    snapshot = table.snapshot()
    assert list(snapshot.summaries()) == [(bound.local_id, "s", "synced")]


def test_pop_and_discard_of_raw_and_parsed_jobs():
    table = JobTable()
    a, b = job("a"), job("b")
    line = a.record_json().encode() + b"\n"
    hold_lines(table, line)
    table[b.local_id] = b
    assert table.raw_count == 1
    assert table.pop(a.local_id).text == "a"
    assert table.raw_count == 0
    table = JobTable()
    hold_lines(table, line)
    table.discard(a.local_id)
    assert table.raw_count == 0 and a.local_id not in table
    assert table.pop("missing", None) is None
    with pytest.raises(KeyError):
        table.pop("missing")


def test_a_lazy_dict_is_built_once_and_only_when_read():
    built = []

    def make() -> dict[str, int]:
        built.append(1)
        return {"a": 1}

    lazy = LazyDict(make)
    assert not built
    assert lazy.get("a") == 1 and len(lazy) == 1 and list(lazy) == ["a"]
    assert built == [1]


def test_a_raw_line_that_no_longer_parses_is_a_clear_error_and_the_next_run_folds_all(data_dir):
    from jobsyncd.errors import JobsyncdError

    a = job("a")
    checked_store(data_dir, [a])
    store, _ = store_of(data_dir)
    table = store.load()
    # What no checked line can be (the CRC would differ): one that does not parse.
    broken = JobTable()
    hold_lines(broken, b'{"local_id":"' + a.local_id.encode() + b'","server_id":nul\n')
    broken.on_broken = table.on_broken
    with pytest.raises(JobsyncdError, match="no longer parses"):
        broken[a.local_id]
    assert not (data_dir / CHECKED_NAME).exists()
    again, _ = store_of(data_dir)
    assert again.load().raw_count == 0


def test_tombstones_among_the_checked_lines_drop_their_jobs(data_dir):
    kept, purged, back = job("kept"), job("purged"), job("purged, then written again")
    checked_store(data_dir, [kept, purged, back])
    store, _ = store_of(data_dir)
    store.load()
    store.append([], purge=[purged.local_id, back.local_id], compact=False)
    store.append([back], compact=False)
    store.compact_if_worth_it()  # saves what is checked: the tombstones included
    lazy, warned = store_of(data_dir)
    table = lazy.load()
    assert table.raw_count == 2
    assert set(table) == {kept.local_id, back.local_id}
    assert not warned


@pytest.mark.parametrize(
    "local_id",
    [
        "short-id",
        "x" * 40,
        "a" * 35 + "\\",  # JSON doubles the backslash: 37 bytes between the quotes
        "é" * 36,  # 36 characters, 72 bytes
        "é" * 18,  # 36 bytes
        "a" * 35 + "\n",  # 36 characters, escaped in JSON
    ],
)
def test_ids_not_of_36_plain_ascii_characters_are_found_as_in_an_eager_fold(data_dir, local_id):
    stamp = "2026-01-01T00:00:00Z"
    odd = Job(local_id=local_id, text="odd", created_at=stamp, updated_at=stamp)
    usual = job("usual")
    writer, _ = store_of(data_dir, lazy=False)
    writer.append([usual, odd])
    writer.compact()  # a store holding such an id gets no record: folded eagerly
    assert not (data_dir / CHECKED_NAME).exists()
    store, warned = store_of(data_dir)
    table = store.load()
    assert table.raw_count == 0
    assert table[local_id].text == "odd" and table[usual.local_id].text == "usual"
    assert not warned


def test_a_job_line_whose_second_key_is_not_its_server_id_is_parsed_by_every_fold(data_dir):
    a = job("a", server_id="s-a", sync_status="synced")
    checked_store(data_dir, [job("first")])
    rec = a.record()
    line = {"local_id": rec.pop("local_id"), "text": rec.pop("text"), **rec}
    append_lines(data_dir, [json.dumps(line, separators=(",", ":")).encode()])
    for _ in range(2):
        store, _ = store_of(data_dir)
        table = store.load()
        assert table.raw_count == 1  # the first job; `a` was parsed
        store.compact_if_worth_it()
        assert (a.local_id, "s-a", "synced") in list(table.summaries())


# ---- the index of the checked lines (checked.INDEX_NAME) ----------------------------------------


def eager_records(data_dir: Path) -> dict[str, dict]:
    store, _ = store_of(data_dir, lazy=False)
    return records(store.load())


def record_json(data_dir: Path) -> dict:
    return json.loads((data_dir / CHECKED_NAME).read_bytes())


def no_line_indexing(monkeypatch) -> None:
    """A fold from here on may not index lines itself: it must read the index."""

    def refuse(*args, **kwargs):
        raise AssertionError("the checked lines were split and searched, not read from the index")

    monkeypatch.setattr("jobsyncd.store.index_lines", refuse)


def test_a_fold_with_an_index_neither_splits_nor_searches_the_checked_lines(
    data_dir, monkeypatch
):
    jobs = varied_jobs()
    checked_store(data_dir, jobs)
    assert (data_dir / INDEX_NAME).stat().st_size > 0
    no_line_indexing(monkeypatch)
    store, warned = store_of(data_dir)
    table = store.load()
    assert table.raw_count == len(jobs)
    statuses = ("pending", "pending_deletion", "error")
    due = {j.local_id for j in table.may_be_due() if j.sync_status in statuses}
    assert due == {j.local_id for j in jobs if j.sync_status in statuses}
    named = [j for j in jobs if any(n in j.record_json().encode() for n in DUE_NEEDLES)]
    assert table.raw_count == len(jobs) - len(named)  # only lines naming a due status parsed
    monkeypatch.undo()
    assert records(table) == eager_records(data_dir)
    assert not warned


def _flip_a_byte(data_dir: Path) -> None:
    path = data_dir / INDEX_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))


def _truncate(data_dir: Path) -> None:
    path = data_dir / INDEX_NAME
    path.write_bytes(path.read_bytes()[:-9])


def _delete(data_dir: Path) -> None:
    (data_dir / INDEX_NAME).unlink()


def _other_byte_order(data_dir: Path) -> None:
    record = record_json(data_dir)
    record["index"]["byteorder"] = "big" if sys.byteorder == "little" else "little"
    (data_dir / CHECKED_NAME).write_text(json.dumps(record))


def _an_offset_past_the_checked_lines(data_dir: Path) -> None:
    """An index that the record's CRC vouches for but that names a place past the lines."""
    record = record_json(data_dir)
    first = new_local_id()
    chunk = encode_chunk(Entries([first], [record["end"] + 10]))
    (data_dir / INDEX_NAME).write_bytes(chunk)
    record["index"].update(chunks=1, size=len(chunk), crc=zlib.crc32(chunk))
    (data_dir / CHECKED_NAME).write_text(json.dumps(record))


def _no_index_in_the_record(data_dir: Path) -> None:
    record = record_json(data_dir)
    record["index"] = None
    (data_dir / CHECKED_NAME).write_text(json.dumps(record))


@pytest.mark.parametrize(
    "spoil",
    [_flip_a_byte, _truncate, _delete, _other_byte_order, _an_offset_past_the_checked_lines,
     _no_index_in_the_record],
)
def test_an_index_not_as_its_record_says_is_made_anew_from_the_lines(
    data_dir, monkeypatch, spoil
):
    jobs = varied_jobs()
    checked_store(data_dir, jobs)
    spoil(data_dir)
    store, warned = store_of(data_dir)
    table = store.load()
    assert table.raw_count == len(jobs)  # the lines themselves are as checked: still held
    assert records(table) == eager_records(data_dir)
    assert not warned
    no_line_indexing(monkeypatch)  # the fold made the index anew: the next one reads it
    again, _ = store_of(data_dir)
    assert again.load().raw_count == len(jobs)


def test_bytes_after_the_indexs_end_are_not_read(data_dir, monkeypatch):
    """A crash between a pass's write of index chunks and of the record leaves chunks the
    record does not name: the next fold reads what the record names, and writes over them."""
    jobs = varied_jobs()
    checked_store(data_dir, jobs)
    with open(data_dir / INDEX_NAME, "ab") as f:
        f.write(b"a chunk the record never named")
    no_line_indexing(monkeypatch)
    store, _ = store_of(data_dir)
    assert store.load().raw_count == len(jobs)
    monkeypatch.undo()
    extra = job("after the crash")
    store.append([extra], compact=False)
    store.compact_if_worth_it()
    assert record_json(data_dir)["index"]["size"] == (data_dir / INDEX_NAME).stat().st_size
    no_line_indexing(monkeypatch)
    again, _ = store_of(data_dir)
    assert again.load().raw_count == len(jobs) + 1


def test_many_small_passes_leave_an_index_of_one_chunk_again(data_dir):
    jobs = [job(f"job {i}") for i in range(300)]  # enough that 70 edits never compact
    checked_store(data_dir, jobs)
    purged = jobs[1].local_id
    for n in range(MAX_CHUNKS + 3):
        store, _ = store_of(data_dir)
        store.load()
        if n == 5:
            store.append([], purge=[purged], compact=False)
        else:
            edited = jobs[0].clone()
            edited.text = f"edit {n}"
            store.append([edited], compact=False)
        store.compact_if_worth_it()
        assert store.jobs.raw_count >= len(jobs) - 2  # lazily folded every time
    chunks = record_json(data_dir)["index"]["chunks"]
    assert chunks <= 4  # made one chunk again once past MAX_CHUNKS, and grown since
    lazy, _ = store_of(data_dir)
    table = lazy.load()
    assert purged not in table and table[jobs[0].local_id].text == f"edit {MAX_CHUNKS + 2}"
    assert records(table) == eager_records(data_dir)


# ---- prefetch: the checked bytes read while the pass imports its HTTP client -------------------


def prefetched(data_dir: Path) -> tuple[list[Job], Store, Warnings]:
    """A checked store of varied jobs, and a Store whose prefetch has read it."""
    jobs = varied_jobs()
    checked_store(data_dir, jobs)
    store, warned = store_of(data_dir)
    store.prefetch()
    store._prefetch[0].join()
    return jobs, store, warned


def test_a_load_after_a_prefetch_holds_what_the_prefetch_read(data_dir, monkeypatch):
    jobs, store, warned = prefetched(data_dir)  # from here on nothing may read the bytes again

    def refuse(*args, **kwargs):
        raise AssertionError("the checked bytes were read again")

    monkeypatch.setattr("jobsyncd.store.read_checked_bytes", refuse)
    no_line_indexing(monkeypatch)
    table = store.load()
    assert table.raw_count == len(jobs)
    monkeypatch.undo()
    assert records(table) == eager_records(data_dir) and not warned


def test_a_prefetch_of_a_store_compacted_since_is_not_used(data_dir):
    jobs, store, _ = prefetched(data_dir)
    other, _ = store_of(data_dir, lazy=False)  # another process edits and compacts meanwhile
    other.load()
    edited = jobs[0].clone()
    edited.text = "edited meanwhile"
    other.append([edited])
    other.compact()
    table = store.load()
    assert table[jobs[0].local_id].text == "edited meanwhile"
    assert records(table) == eager_records(data_dir)


def test_lines_appended_after_a_prefetch_are_folded(data_dir):
    jobs, store, _ = prefetched(data_dir)
    other, _ = store_of(data_dir, lazy=False)
    extra = job("appended after the prefetch")
    other.append([extra])
    table = store.load()
    assert table.raw_count == len(jobs) and table[extra.local_id].text == extra.text
    assert records(table) == eager_records(data_dir)


def test_a_prefetch_never_used_is_dropped_by_an_eager_load_and_by_drop(data_dir):
    checked_store(data_dir, varied_jobs())
    store, _ = store_of(data_dir, lazy=False)
    store.prefetch()
    store.load()
    assert store._prefetch is None
    store.prefetch()
    store.drop_prefetch()
    assert store._prefetch is None


def test_a_pass_prefetches_only_a_store_it_will_fold(data_dir):
    from jobsyncd.sync.run import SPARSE_MAX_DUE, prepare_pass

    synced = [job(f"s{i}", server_id=f"s-{i}", sync_status="synced") for i in range(40)]
    checked_store(data_dir, synced)
    idle, _ = store_of(data_dir, lazy=False)
    prepare_pass(idle)  # nothing due: the pass pushes nothing and folds nothing
    assert idle.fold_lazily and idle._prefetch is None
    writer, _ = store_of(data_dir, lazy=False)
    writer.append([job(f"new {i}") for i in range(SPARSE_MAX_DUE + 1)])
    busy, _ = store_of(data_dir, lazy=False)
    prepare_pass(busy)  # too many due to push unfolded: the fold's bytes are read meanwhile
    assert busy._prefetch is not None
    assert busy.load().raw_count == len(synced)


def test_compaction_indexes_a_large_store_in_several_chunks(data_dir, monkeypatch):
    monkeypatch.setattr("jobsyncd.store.CHUNK_LINES", 3000)  # 5,000 lines: two chunks
    jobs = [job(f"job {i}", sync_status="synced" if i % 3 else "pending") for i in range(5000)]
    checked_store(data_dir, jobs)
    assert record_json(data_dir)["index"]["chunks"] == 2
    no_line_indexing(monkeypatch)
    store, _ = store_of(data_dir)
    table = store.load()
    assert table.raw_count == len(jobs)
    assert {j.local_id for j in table.may_be_due() if j.sync_status == "pending"} == {
        j.local_id for j in jobs if j.sync_status == "pending"
    }
    monkeypatch.undo()
    assert records(table) == eager_records(data_dir)


@pytest.mark.parametrize("due_count", [0, 1, 3, 10, 20])
def test_the_due_lines_of_a_block_are_found_whether_few_or_many(due_count):
    """A byte search per needle when few lines name a due status, a look at each line when
    many do: the same ids either way (metadata naming a status counts: it is only a lead)."""
    from jobsyncd.jobtable import due_ids

    jobs = [job(f"due {i}") for i in range(due_count)]
    jobs += [job(f"synced {i}", server_id=f"s{i}", sync_status="synced") for i in range(20)]
    jobs.append(job("lead", sync_status="synced", metadata={"sync_status": "error"}))
    lines = [j.record_json().encode() for j in jobs]
    data = b"\n".join(lines) + b"\n"
    expected = [j.local_id for j in jobs if j.sync_status == "pending" or j.text == "lead"]
    assert sorted(due_ids(data, [j.local_id for j in jobs], lines)) == sorted(expected)


def test_a_pass_leaves_the_due_hint_so_the_next_look_reads_only_new_lines(data_dir, monkeypatch):
    from jobsyncd.store import HINT_NAME

    jobs = [job(f"s{i}", server_id=f"s-{i}", sync_status="synced") for i in range(30)]
    erred = job("erred", server_id="s-e", sync_status="error", retry_count=1)
    checked_store(data_dir, [*jobs, erred])
    store, _ = store_of(data_dir)  # a pass: folds, writes its outcomes, ends
    store.load()
    edited = jobs[0].clone()
    edited.text = "pushed"
    store.append([edited], compact=False)
    store.compact_if_worth_it()
    hint = json.loads((data_dir / HINT_NAME).read_bytes())
    assert hint["end"] == (data_dir / STORE_NAME).stat().st_size
    assert hint["due"] == [erred.local_id]
    new = job("created after the pass")
    writer, _ = store_of(data_dir, lazy=False)
    writer.append([new])
    searched = []
    real = __import__("jobsyncd.store", fromlist=["due_candidates"]).due_candidates

    def spy(data, limit, **kwargs):
        searched.append(kwargs.get("start", 0))
        return real(data, limit, **kwargs)

    monkeypatch.setattr("jobsyncd.store.due_candidates", spy)
    look, _ = store_of(data_dir, lazy=False)
    assert sorted(look.due_candidates(32)) == sorted([erred.local_id, new.local_id])
    assert searched == [hint["end"]]  # from where the pass's hint ends, not the whole store


def test_a_prefetch_that_fails_says_nothing_and_the_load_reads_for_itself(
    data_dir, monkeypatch, capfd
):
    jobs = varied_jobs()
    checked_store(data_dir, jobs)
    store, warned = store_of(data_dir)

    def broken(*args, **kwargs):
        raise MemoryError("no room for the checked bytes")

    monkeypatch.setattr("jobsyncd.store.read_index", broken)
    store.prefetch()
    store._prefetch[0].join()
    monkeypatch.undo()
    table = store.load()
    assert table.raw_count == len(jobs) and records(table) == eager_records(data_dir)
    assert capfd.readouterr().err == "" and not warned  # no thread's traceback


@pytest.mark.parametrize(
    "field, value",
    [("end", 10**15), ("end", -5), ("size", 10**15), ("size", -5), ("chunks", -1)],
)
def test_a_record_claiming_impossible_sizes_is_ignored_without_reading_them(
    data_dir, capfd, field, value
):
    """A record not ours (edited, or of a bug) never makes a fold read what it claims: a
    petabyte, or a negative size, is a record to ignore, with no traceback."""
    jobs = varied_jobs()
    checked_store(data_dir, jobs)
    record = record_json(data_dir)
    (record["index"] if field in ("size", "chunks") else record)[field] = value
    (data_dir / CHECKED_NAME).write_text(json.dumps(record))
    for prefetch in (False, True):
        store, warned = store_of(data_dir)
        if prefetch:
            store.prefetch()
        table = store.load()
        assert records(table) == eager_records(data_dir) and not warned
    assert "Traceback" not in capfd.readouterr().err
