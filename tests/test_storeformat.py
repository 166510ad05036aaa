"""The store's line layout, as storeformat.py states it, is what `Job.record()` / `record_json()`
and the encoder really write: the byte scanner relies on it to find jobs without parsing.

If someone reorders the keys of a record in model.py (or loosens the JSON), these fail rather
than the scanner silently finding nothing."""

from __future__ import annotations

import ast
import datetime as dt
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from jobsyncd import storeformat as fmt
from jobsyncd.model import STATUSES, Job

# Texts a scanner could trip on: quotes, backslashes, newlines, other line breaks, non-ASCII,
# and the very byte patterns it searches for.
NASTY = st.sampled_from(
    [
        '"',
        "\\",
        "\n",
        "\r\n",
        "\u2028",
        "é",
        "日本",
        "🎙",
        '"sync_status":"pending"',
        '"sync_status":"synced"',
        '\n{"local_id":"',
        '","server_id":"s-1",',
    ]
)
TEXT = st.lists(NASTY | st.text(max_size=6), max_size=4).map("".join)
STATUS_NAMING_KEYS = st.sampled_from(["sync_status", "local_id", "server_id", "k"])
METADATA = st.dictionaries(
    STATUS_NAMING_KEYS | TEXT,
    TEXT | st.sampled_from(list(STATUSES)) | st.integers() | st.none(),
    max_size=3,
)
TEXT_OR_NONE = st.none() | TEXT


def _jobs() -> st.SearchStrategy[Job]:
    return st.builds(
        lambda lid, **kw: Job(str(lid), **kw),
        st.uuids(),
        server_id=TEXT_OR_NONE,
        text=TEXT,
        audio_file=TEXT_OR_NONE,
        metadata=METADATA,
        server_status=TEXT_OR_NONE,
        sync_status=st.sampled_from(list(STATUSES)),
        retry_count=st.integers(0, 99),
        last_sync_attempt_at=TEXT_OR_NONE,
        last_error=TEXT_OR_NONE,
        created_at=TEXT,
        updated_at=TEXT,
        rev=st.integers(0, 2**40),
        base=st.none() | st.fixed_dictionaries({"text": TEXT, "metadata": METADATA}),
        create_sent=st.booleans(),
        audio_sent=TEXT_OR_NONE,
        error_kind=st.none() | st.sampled_from(["gone", "delete", "unconfirmed"]),
        next_attempt_at=TEXT_OR_NONE,
        upload_url=TEXT_OR_NONE,
        upload_for=TEXT_OR_NONE,
        upload_offset=st.integers(0, 2**40),
    )


def _line(job: Job) -> bytes:
    line = job.record_json().encode() + b"\n"
    assert line == fmt.encode_record(job.record())  # the fast path writes the same bytes
    assert line == fmt.encode_lines([job])
    return line


def _status_at(line: bytes, record: dict[str, Any]) -> int:
    """Where the record's top-level status field starts in its line, worked out with the
    standard library's encoder from the keys written before it."""
    before = []
    for key, value in record.items():
        if key == fmt.STATUS_KEY:
            break
        before.append(
            json.dumps(key) + ":" + json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        )
    return len(("{" + ",".join(before) + ("," if before else "")).encode())


@settings(max_examples=300, deadline=None)
@given(_jobs())
def test_a_jobs_line_starts_with_its_head_and_server_id_and_holds_no_raw_newline(job: Job):
    line = _line(job)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    head = fmt.head_of(job.local_id)
    assert len(head) == fmt.HEAD_LENGTH
    assert line.startswith(fmt.RECORD_HEAD + job.local_id.encode() + b'"')
    assert line.startswith(head) and fmt.is_head(line[: fmt.HEAD_LENGTH])
    assert fmt.local_id_in(line[: fmt.HEAD_LENGTH]) == job.local_id
    match = fmt.HEAD_AT_LINE_START.match(line)
    assert match is not None and match.group(0) == head
    server_id = json.dumps(job.server_id, ensure_ascii=False).encode()
    assert line[fmt.HEAD_LENGTH :].startswith(fmt.SERVER_ID_FIELD + server_id + b",")
    # The head starts no other line: nothing in the record writes a raw newline before it.
    assert fmt.HEAD_AT_LINE_START.findall(line) == [head]
    assert json.loads(line) == json.loads(json.dumps(job.record()))


@settings(max_examples=300, deadline=None)
@given(_jobs())
def test_the_status_field_is_where_the_record_puts_it_and_a_due_needle_is_there_iff_due(job: Job):
    line = _line(job)
    record = job.record()
    pos = _status_at(line, record)
    assert line.startswith(fmt.STATUS_FIELD + json.dumps(job.sync_status).encode(), pos)
    due_here = any(line.startswith(n, pos) for n in fmt.DUE_NEEDLES)
    assert due_here == (job.sync_status in fmt.DUE_STATUSES)
    assert line.startswith(fmt.SYNCED_NEEDLE, pos) == (job.sync_status == "synced")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_jobs(), st.booleans()), min_size=1, max_size=8), st.data())
def test_the_scanner_reads_generated_lines_as_a_fold_does(versions, data):
    """Several versions of a few jobs and tombstones: the scanner's latest record and due jobs
    are the fold's, whatever the texts and metadata name."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    lines, latest = [], {}
    for job, purge in versions:
        job.local_id = data.draw(st.sampled_from(ids))
        if purge:
            lines.append(fmt.encode_record(fmt.tombstone(job.local_id)))
            latest[job.local_id] = fmt.tombstone(job.local_id)
        else:
            lines.append(_line(job))
            latest[job.local_id] = json.loads(lines[-1])
    blob = b"".join(lines)
    for local_id in ids:
        assert fmt.latest_record(blob, fmt.head_of(local_id), local_id) == latest.get(local_id)
        if local_id in latest:
            assert local_id in fmt.ids_with_prefix(blob, local_id[:8])
    due = {i for i, r in latest.items() if r.get(fmt.STATUS_KEY) in fmt.DUE_STATUSES}
    for few in (0, 8):  # one scan of the file, and each job backwards from the end
        assert set(fmt.due_candidates(blob, 100, few_heads=few) or ()) == due


def test_a_tombstone_line_starts_with_its_head():
    local_id = str(uuid.uuid4())
    line = fmt.encode_record(fmt.tombstone(local_id))
    assert line == b'{"local_id":"' + local_id.encode() + b'","purged":true}\n'
    assert fmt.HEAD_AT_LINE_START.match(line).group(0) == fmt.head_of(local_id)
    assert fmt.valid_record(json.loads(line))


def test_the_due_needles_find_exactly_the_statuses_a_pass_pushes():
    from jobsyncd.sync.rules import is_due as _is_due

    now = dt.datetime.now(dt.timezone.utc)
    pushed = {s for s in STATUSES if _is_due(Job(str(uuid.uuid4()), sync_status=s), now)}
    assert set(fmt.DUE_STATUSES) == pushed
    for status in STATUSES:
        field = fmt.STATUS_FIELD + json.dumps(status).encode()
        assert any(field.startswith(n) for n in fmt.DUE_NEEDLES) == (status in pushed), status
    assert fmt.DUE_NEEDLES == (b'"sync_status":"pending', b'"sync_status":"error"')


def test_the_format_imports_only_the_model_and_nothing_heavy():
    path = Path(fmt.__file__)
    ours = {
        node.module
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level
    }
    assert ours == {"model"}
    code = "import sys, jobsyncd.storeformat; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert not {"requests", "click", "hashlib", "jobsyncd.store", "jobsyncd.sync"} & set(loaded)


def test_a_job_whose_metadata_names_synced_is_not_counted_as_synced(tmp_path):
    """The deletion guard counts the synced jobs a feed leaves: a pending job that merely has
    metadata sync_status=synced must not make a feed that deletes every synced job look safe."""
    from jobsyncd.store import Store, prepare_data_dir

    pending = Job(str(uuid.uuid4()), text="t", metadata={"sync_status": "synced"})
    synced = Job(str(uuid.uuid4()), text="t", sync_status="synced", server_id="s-1")
    blob = fmt.encode_lines([pending, synced])
    assert fmt.synced_ids(blob, set(), 5, 64) == {synced.local_id}
    assert fmt.synced_ids(blob, {synced.local_id}, 5, 64) == set()

    prepare_data_dir(str(tmp_path / "d"))
    store = Store(str(tmp_path / "d"), warn=lambda m: None)
    store.append([pending, synced])
    assert Store(store.data_dir).synced_jobs_besides({synced.local_id}, 1) == 0
    # A synced job's later line that cannot be read is passed over, as a fold would.
    with open(store.path, "ab") as fh:
        fh.write(fmt.head_of(synced.local_id) + b',"server_id":"s-1","sync_status":"synced"\n')
    assert Store(store.data_dir, warn=lambda m: None).synced_jobs_besides(set(), 5) == 1
