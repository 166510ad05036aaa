"""The pass's outcomes applied by `jobsyncd.sync.outcomes.apply`: pure logic, no store, no
server. One table: each outcome against the job as the pass saw it, the job edited while the
pass talked (a newer rev), and the job gone; what the job becomes and what is counted."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from jobsyncd.api import ServerJob
from jobsyncd.model import Job
from jobsyncd.sync.outcomes import (
    AddedFromServer,
    BackToPending,
    DeletedOnServer,
    Pushed,
    PushFailed,
    Rebound,
    RemovedByServer,
    ServerCopyTaken,
    apply,
)
from jobsyncd.sync.rules import Policy

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
LID = "0193a0a0-0000-7000-8000-000000000001"
OTHER = "0193a0a0-0000-7000-8000-000000000002"


def sj(server_id="s1", text="server text", local_id=LID, audio=None):
    return ServerJob(server_id, local_id, text, {}, "queued", audio, None, None)


def job(status="pending", rev=1, server_id=None, text="mine", **more):
    base = {"text": "old", "metadata": {}} if server_id else None
    return Job(
        LID,
        text=text,
        metadata={},
        sync_status=status,
        rev=rev,
        server_id=server_id,
        base=base,
        created_at="2026-12-01T11:00:00Z",
        updated_at="2026-12-01T11:00:00Z",
        **more,
    )


class View:
    def __init__(self, *jobs):
        self.jobs = {j.local_id: j for j in jobs}

    def get(self, local_id):
        return self.jobs.get(local_id)

    def has_server_id(self, server_id):
        return any(j.server_id == server_id for j in self.jobs.values())


POLICY = Policy()


def run(view, outcome, policy=POLICY):
    return apply(view, outcome, policy, NOW, random.Random(1))


# (name, the job as the pass saw it, the job now (None: gone), outcome, status after or
#  "purged" or None (nothing changes), counts)
CASES = [
    (
        "a create answered with the same text: synced",
        job(),
        job(),
        lambda snap: Pushed(snap, sj(text="mine"), None, created=True),
        "synced",
        (),
    ),
    (
        "a create answered but the job was edited meanwhile: stays pending, bound",
        job(),
        job(rev=2, text="newer"),
        lambda snap: Pushed(snap, sj(text="mine"), None, created=True),
        "pending",
        (),
    ),
    (
        "a create answered with another version (an earlier lost POST): stays pending",
        job(),
        job(),
        lambda snap: Pushed(snap, sj(text="not mine"), None, created=True),
        "pending",
        (),
    ),
    (
        "a create answered for a job deleted meanwhile: nothing",
        job(),
        None,
        lambda snap: Pushed(snap, sj(text="mine"), None, created=True),
        None,
        (),
    ),
    (
        "a delete that reached the server: the job goes",
        job(status="pending_deletion", server_id="s1"),
        job(status="pending_deletion", server_id="s1"),
        lambda snap: DeletedOnServer(snap.local_id),
        "purged",
        (),
    ),
    (
        "a transient failure: error with back-off",
        job(),
        job(),
        lambda snap: PushFailed(snap, "503", permanent=False, gone=False),
        "error",
        (),
    ),
    (
        "a transient failure of the last retry: failed, counted as failed not as an error",
        job(status="error", retry_count=4),
        job(status="error", retry_count=4),
        lambda snap: PushFailed(snap, "503", permanent=False, gone=False),
        "failed",
        (("errors", -1), ("failed", 1)),
    ),
    (
        "a permanent failure: failed at once",
        job(),
        job(),
        lambda snap: PushFailed(snap, "422", permanent=True, gone=False),
        "failed",
        (),
    ),
    (
        "a failure of a job edited meanwhile: the new version gets a fresh attempt",
        job(),
        job(rev=2),
        lambda snap: PushFailed(snap, "503", permanent=False, gone=False),
        None,
        (),
    ),
    (
        "the server's copy of a synced job: taken",
        job(status="synced", server_id="s1"),
        job(status="synced", server_id="s1"),
        lambda snap: ServerCopyTaken(snap.local_id, snap.rev, sj()),
        "synced",
        (("pulled", 1),),
    ),
    (
        "the server's copy of a job edited here meanwhile: never overwrites the edit",
        job(status="synced", server_id="s1"),
        job(status="pending", server_id="s1", rev=2),
        lambda snap: ServerCopyTaken(snap.local_id, snap.rev, sj()),
        None,
        (),
    ),
    (
        "a synced job the server deleted: removed here",
        job(status="synced", server_id="s1"),
        job(status="synced", server_id="s1"),
        lambda snap: RemovedByServer(snap.local_id, "s1"),
        "purged",
        (("deleted_locally", 1),),
    ),
    (
        "a job the server deleted but edited here meanwhile: kept",
        job(status="synced", server_id="s1"),
        job(status="pending", server_id="s1", rev=2),
        lambda snap: RemovedByServer(snap.local_id, "s1"),
        None,
        (),
    ),
    (
        "--reupload of a synced job the server lacks: pending again",
        job(status="synced", server_id="s1"),
        job(status="synced", server_id="s1"),
        lambda snap: BackToPending(snap.local_id, "s1"),
        "pending",
        (("reuploaded", 1),),
    ),
    (
        "a synced job re-created on the server under its local_id: rebound, server wins",
        job(status="synced", server_id="old"),
        job(status="synced", server_id="old"),
        lambda snap: Rebound(snap.local_id, "old", sj("new")),
        "synced",
        (("pulled", 1),),
    ),
    (
        "a rebind of a job bound elsewhere meanwhile: nothing",
        job(status="synced", server_id="old"),
        job(status="synced", server_id="other"),
        lambda snap: Rebound(snap.local_id, "old", sj("new")),
        None,
        (),
    ),
]


@pytest.mark.parametrize(
    "snap, current, make, after, counts", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_outcome_applies_to_the_job_as_it_is_now(snap, current, make, after, counts):
    view = View(current) if current is not None else View()
    applied = run(view, make(snap))
    assert applied.counts == counts
    if after is None:
        assert applied.job is None and applied.purged is None
    elif after == "purged":
        assert applied.purged == LID and applied.job is None
    else:
        assert applied.job is not None and applied.job.sync_status == after
    if current is not None:
        assert view.get(LID) is current  # apply changes nothing in place


def test_a_job_from_the_server_is_added_under_its_local_id_when_that_is_free():
    applied = run(View(), AddedFromServer(sj("s9")))
    assert applied.job is not None
    assert (applied.job.local_id, applied.job.server_id) == (LID, "s9")
    assert applied.job.sync_status == "synced" and applied.counts == (("pulled", 1),)


def test_a_job_from_the_server_whose_local_id_is_taken_gets_a_new_one():
    applied = run(View(job(server_id="s1")), AddedFromServer(sj("s9")))
    assert applied.job is not None and applied.job.local_id not in (LID, OTHER)


def test_a_job_from_the_server_already_bound_here_is_not_added_twice():
    assert run(View(job(server_id="s9")), AddedFromServer(sj("s9", local_id=OTHER))).job is None


def test_a_rebind_keeps_the_audio_sent_only_when_the_servers_hash_is_the_files():
    here = job(status="pending", server_id="old", audio_file="/a.wav")
    same = Rebound(LID, "old", sj("new", audio={"sha256": "ab"}), "/a.wav", "ab")
    other = Rebound(LID, "old", sj("new", audio={"sha256": "cd"}), "/a.wav", "ab")
    assert run(View(here), same).job.audio_sent == "/a.wav"
    assert run(View(here), other).job.audio_sent is None




def test_an_update_answered_takes_the_servers_copy_of_the_fields_it_did_not_send():
    snap = job(status="pending", server_id="s1", text="mine")
    answer = ServerJob("s1", LID, "mine", {"other": "client"}, "done", None, None, None)
    applied = run(View(snap), Pushed(snap, answer, None, created=False))
    assert applied.job is not None and applied.job.sync_status == "synced"
    assert applied.job.metadata == {"other": "client"} and applied.job.server_status == "done"
    assert applied.job.base == {"text": "mine", "metadata": {"other": "client"}}
    assert applied.job.last_sync_attempt_at == "2026-12-01T12:00:00.000Z" and not applied.again


def test_a_push_answered_while_the_job_changed_binds_it_and_asks_for_another_pass():
    snap = job()
    applied = run(View(job(rev=2, text="newer")), Pushed(snap, sj(text="mine"), None, True))
    assert applied.again and applied.job is not None
    assert (applied.job.server_id, applied.job.create_sent, applied.job.text) == ("s1", True, "newer")
    assert applied.job.sync_status == "pending"


def test_a_push_whose_audio_the_server_does_not_hold_stays_pending():
    snap = job(audio_file="/a.wav")
    applied = run(View(snap), Pushed(snap, sj(text="mine"), None, created=True))
    assert applied.job is not None and applied.job.sync_status == "pending" and applied.again


def test_a_patch_answered_404_fails_the_job_as_gone():
    snap = job(status="pending", server_id="s1")
    applied = run(View(snap), PushFailed(snap, "404", permanent=True, gone=True))
    assert applied.job is not None
    assert (applied.job.sync_status, applied.job.error_kind) == ("failed", "gone")


def test_a_deletion_that_errors_stays_a_deletion_with_its_back_off():
    snap = job(status="pending_deletion", server_id="s1")
    applied = run(View(snap), PushFailed(snap, "503", permanent=False, gone=False))
    assert applied.job is not None
    assert (applied.job.sync_status, applied.job.error_kind) == ("pending_deletion", "delete")
    assert applied.job.next_attempt_at is not None


def test_an_invalid_create_answer_naming_an_id_binds_the_job_as_unconfirmed():
    snap = job()
    applied = run(View(snap), PushFailed(snap, "bad", permanent=False, gone=False, bind_id="s7"))
    assert applied.job is not None
    assert (applied.job.server_id, applied.job.error_kind) == ("s7", "unconfirmed")
    bound = job(server_id="s1")
    kept = run(View(bound), PushFailed(bound, "bad", permanent=False, gone=False, bind_id="s7"))
    assert kept.job is not None and kept.job.server_id == "s1"


def test_a_back_off_is_drawn_from_the_policy_and_the_time_given():
    applied = run(View(job()), PushFailed(job(), "503", False, False), Policy(backoff_base_seconds=60))
    assert applied.job is not None and applied.job.next_attempt_at is not None
    wait = dt.datetime.fromisoformat(applied.job.next_attempt_at.replace("Z", "+00:00")) - NOW
    assert dt.timedelta(seconds=1) <= wait <= dt.timedelta(seconds=120)


def test_a_job_removed_names_its_audio_copy_for_removal_after_the_write():
    gone_here = job(status="pending_deletion", server_id="s1", audio_file="/d/audio/x.wav")
    assert run(View(gone_here), DeletedOnServer(LID)).audio_to_remove == "/d/audio/x.wav"
    synced = job(status="synced", server_id="s1", audio_file="/d/audio/y.wav")
    removed = run(View(synced), RemovedByServer(LID, "s1"))
    assert (removed.audio_to_remove, removed.line) == ("/d/audio/y.wav", ("removed", LID, ""))


def test_an_outcome_apply_does_not_know_is_refused_never_taken_for_a_deletion():
    with pytest.raises(TypeError):
        run(View(job(status="synced", server_id="s1")), object())  # type: ignore[arg-type]
