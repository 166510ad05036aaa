"""The command line people reach for (issue 10; contract section 2): text from a file, stdin or an
editor, `--no-audio`, finding jobs with `list`, several JOBs at once, and shell completion.
All of it through the installed `jobsyncd`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from jobsyncd.model import Job, new_local_id
from jobsyncd.store import STORE_NAME, Store, prepare_data_dir


def run(cli, *args: str, code: int = 0, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = cli(*args, input=input)
    assert proc.returncode == code, (
        f"jobsyncd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr
    return proc


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobsyncd: error: "), proc.stderr
    return lines[0]


def show(cli, ref: str) -> dict:
    return json.loads(run(cli, "show", ref, "--json").stdout)


def store_bytes(cli) -> bytes:
    path = cli.data_dir / STORE_NAME
    return path.read_bytes() if path.exists() else b""


def seed(cli, *jobs: Job) -> None:
    old = os.umask(0o077)
    try:
        prepare_data_dir(str(cli.data_dir))
        Store(str(cli.data_dir)).append(list(jobs))
    finally:
        os.umask(old)


def seeded(local_id: str | None = None, created_at: str = "2026-01-01T00:00:00.000Z", **kw) -> Job:
    kw.setdefault("updated_at", created_at)
    return Job(local_id=local_id or new_local_id(), created_at=created_at, **kw)


def editor(tmp_path: Path, name: str, body: str) -> str:
    """A shell script used as $EDITOR: `$1` is the file to edit."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# ---- text from a file, stdin or an editor ----------------------------------------------------


def test_text_from_stdin_over_300_kib_round_trips_byte_exact_to_the_store_and_server(cli, ref_server):
    line = "Dictée n° 42: the patient said “fine”\tthen\r\n"
    text = (line * (310 * 1024 // len(line.encode()) + 1)) + "no newline at the end  "
    assert len(text.encode()) > 300 * 1024
    local_id = run(cli, "create", "--text-file", "-", input=text).stdout.strip()
    assert show(cli, local_id)["text"] == text
    run(cli, "sync", "--server", ref_server.url)
    (server_job,) = ref_server.jobs()
    assert server_job["text"] == text


def test_text_from_a_file_is_taken_unchanged(cli, tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"first\nsecond\n\n")
    local_id = run(cli, "create", "--text-file", str(path)).stdout.strip()
    assert show(cli, local_id)["text"] == "first\nsecond\n\n"
    path.write_bytes(b"new")
    run(cli, "update", local_id, "--text-file", str(path))
    assert show(cli, local_id)["text"] == "new"


@pytest.mark.parametrize("source", ["stdin", "file"])
def test_text_that_is_not_utf8_is_a_usage_error_and_changes_nothing(cli, tmp_path, source):
    raw = b"caf\xe9"
    path = tmp_path / "latin1.txt"
    path.write_bytes(raw)
    arg = "-" if source == "stdin" else str(path)
    proc = subprocess.run(
        [cli.binary, "create", "--text-file", arg], input=raw, env=cli.env, capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert b"not UTF-8" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert store_bytes(cli) == b""


@pytest.mark.parametrize(
    "args",
    [("--text", "a", "--text-file", "-"), ("--text", "a", "--edit"), ("--text-file", "-", "--edit")],
)
def test_text_text_file_and_edit_are_exclusive(cli, args):
    for command in (("create",), ("update", "abcdef")):
        proc = run(cli, *command, *args, code=2, input="x")
        assert "cannot be used together" in one_error_line(proc)
    assert store_bytes(cli) == b""


def test_a_missing_text_file_is_a_usage_error(cli, tmp_path):
    one_error_line(run(cli, "create", "--text-file", str(tmp_path / "nope"), code=2))


def test_edit_writes_the_text_in_visual_before_editor_removing_one_trailing_newline(cli, tmp_path):
    cli.env["EDITOR"] = editor(tmp_path, "ed1", "exit 1")
    cli.env["VISUAL"] = editor(tmp_path, "ed2", "printf 'from the editor\\n\\n' > \"$1\"")
    local_id = run(cli, "create", "--edit").stdout.strip()
    assert show(cli, local_id)["text"] == "from the editor\n"


def test_update_edit_starts_from_the_current_text(cli, tmp_path):
    local_id = run(cli, "create", "--text", "line one").stdout.strip()
    cli.env.pop("VISUAL", None)
    cli.env["EDITOR"] = editor(tmp_path, "ed", "printf 'line two\\n' >> \"$1\"")
    run(cli, "update", local_id, "--edit")
    job = show(cli, local_id)
    assert job["text"] == "line one\nline two"
    assert job["sync_status"] == "pending"


@pytest.mark.parametrize(
    "body, what", [("exit 3", "failed"), (":", "unchanged"), ("touch \"$1\"", "unchanged")]
)
def test_edit_changes_nothing_when_the_editor_fails_or_leaves_the_text(cli, tmp_path, body, what):
    local_id = run(cli, "create", "--text", "keep me").stdout.strip()
    before = store_bytes(cli)
    cli.env.pop("VISUAL", None)
    cli.env["EDITOR"] = editor(tmp_path, "ed", body)
    for command in (("create", "--edit"), ("update", local_id, "--edit")):
        line = one_error_line(run(cli, *command, code=1))
        assert "nothing changed" in line, line
    assert store_bytes(cli) == before


def test_update_no_audio_removes_the_copy_and_makes_the_job_pending(cli, tmp_path):
    src = tmp_path / "memo.wav"
    src.write_bytes(b"RIFF" + os.urandom(100))
    seed(cli, seeded(local_id := new_local_id(), text="t", server_id="s-1", sync_status="synced"))
    run(cli, "update", local_id, "--audio", str(src))
    seed_copy = show(cli, local_id)["audio_file"]
    assert Path(seed_copy).exists()
    job = json.loads(run(cli, "update", local_id, "--no-audio", "--json").stdout)
    assert job["audio_file"] is None and job["sync_status"] == "pending"
    assert not Path(seed_copy).exists() and src.exists()
    assert run(cli, "update", local_id, "--no-audio").stdout.strip().endswith("(unchanged)")


def test_update_audio_and_no_audio_together_is_a_usage_error(cli, tmp_path):
    src = tmp_path / "memo.wav"
    src.write_bytes(b"RIFF")
    local_id = run(cli, "create").stdout.strip()
    one_error_line(run(cli, "update", local_id, "--audio", str(src), "--no-audio", code=2))


# ---- finding jobs ----------------------------------------------------------------------------


def _list_ids(cli, *args: str) -> list[str]:
    return [json.loads(line)["local_id"] for line in run(cli, "list", "--json", *args).stdout.splitlines()]


def test_list_reverse_gives_the_newest_first_and_limit_applies_after_it(cli):
    jobs = [seeded(created_at=f"2026-01-0{d}T00:00:00.000Z") for d in (3, 1, 2)]
    seed(cli, *jobs)
    oldest_first = [jobs[1].local_id, jobs[2].local_id, jobs[0].local_id]
    assert _list_ids(cli) == oldest_first
    assert _list_ids(cli, "--reverse") == oldest_first[::-1]
    assert _list_ids(cli, "--reverse", "--limit", "1") == [jobs[0].local_id]


def test_list_search_looks_in_text_and_metadata_values_at_any_depth_ignoring_case(cli):
    by_text = seeded(text="Call Mrs SMITH back")
    nested = seeded(metadata={"a": {"b": [1, {"c": "smithfield"}]}})
    number = seeded(metadata={"n": 12345, "flag": True})
    key_only = seeded(metadata={"smith": "x"})
    seed(cli, by_text, nested, number, key_only)
    assert set(_list_ids(cli, "--search", "smith")) == {by_text.local_id, nested.local_id}
    assert _list_ids(cli, "--search", "234") == [number.local_id]
    assert _list_ids(cli, "--search", "TRUE") == [number.local_id]
    assert _list_ids(cli, "--search", "nobody") == []
    assert "SMITH" in run(cli, "list", "--search", "smith").stdout


def test_every_id_the_table_shows_is_accepted_by_show(cli, tmp_path):
    twins = [seeded("abcdef12" + new_local_id()[8:]), seeded("abcdef12" + new_local_id()[8:])]
    long_sid = seeded(server_id="job-" + "9" * 30, sync_status="synced")
    tricky = seeded(server_id=twins[0].local_id[:10], sync_status="synced")  # a prefix of another
    shared = [seeded(server_id="same", sync_status="synced") for _ in range(2)]
    src = tmp_path / "a.wav"
    src.write_bytes(b"RIFF")
    seed(cli, *twins, long_sid, tricky, *shared)
    run(cli, "update", long_sid.local_id, "--audio", str(src))
    out = run(cli, "list").stdout.splitlines()
    header, rows = out[0], out[1:]
    assert "UTC" in header and "AUDIO" in header
    by_id = {}
    for row in rows:
        local, status, server = row.split()[:3]
        job = show(cli, local)
        if server != "-":
            assert show(cli, server)["local_id"] == job["local_id"]
        assert len(local) >= 8
        by_id[job["local_id"]] = row
    # The two jobs sharing the server id "same" break the store's one-binding invariant: a load
    # keeps the binding on one and drops the other, a mere synced copy (with a warning).
    assert len(by_id) == len(rows) == 5
    assert "job-" + "9" * 30 in by_id[long_sid.local_id]
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", by_id[long_sid.local_id])
    assert " yes " in by_id[long_sid.local_id]
    assert twins[0].local_id[:10] not in by_id[tricky.local_id].split()[2]


# ---- several JOBs at once --------------------------------------------------------------------


def test_delete_takes_several_jobs(cli):
    ids = [run(cli, "create", "--text", str(i)).stdout.strip() for i in range(3)]
    assert run(cli, "delete", ids[0], ids[1][:8]).stdout.split() == ids[:2]
    assert [show(cli, i)["sync_status"] for i in ids] == ["pending_deletion"] * 2 + ["pending"]


def test_delete_with_one_unknown_job_changes_nothing(cli):
    ids = [run(cli, "create", "--text", str(i)).stdout.strip() for i in range(2)]
    before = store_bytes(cli)
    line = one_error_line(run(cli, "delete", ids[0], "ffffffff", ids[1], code=1))
    assert "ffffffff" in line
    assert store_bytes(cli) == before


def test_retry_takes_several_failed_jobs_and_refuses_all_if_one_is_not_failed(cli):
    failed = [seeded(sync_status="failed", retry_count=5) for _ in range(2)]
    fine = seeded(sync_status="synced", server_id="x1")
    seed(cli, *failed, fine)
    before = store_bytes(cli)
    line = one_error_line(run(cli, "retry", failed[0].local_id, fine.local_id, code=1))
    assert fine.local_id in line and "not failed" in line
    assert store_bytes(cli) == before
    out = run(cli, "retry", failed[0].local_id, failed[1].local_id).stdout.split()
    assert out == [failed[0].local_id, failed[1].local_id]
    assert {show(cli, j.local_id)["sync_status"] for j in failed} == {"pending"}


# ---- shell completion ------------------------------------------------------------------------


def complete(cli, words: str, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Click's bash protocol against the installed binary: (type, value) per candidate."""
    parts = words.split(" ")
    proc = subprocess.run(
        [cli.binary],
        env={**cli.env, **(env or {}), "_JOBSYNCD_COMPLETE": "bash_complete",
             "COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1)},
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return [tuple(line.split(",", 1)) for line in proc.stdout.splitlines() if line]


def test_completion_answers_a_prefix_with_the_matching_local_and_server_ids(cli):
    a = seeded("abc12345" + new_local_id()[8:], server_id="ab-77", sync_status="synced")
    b = seeded("abd00000" + new_local_id()[8:])
    c = seeded("ffff0000" + new_local_id()[8:], server_id="zz-1", sync_status="synced")
    gone = seeded("abe00000" + new_local_id()[8:])
    seed(cli, a, b, c, gone)
    run(cli, "delete", gone.local_id)
    Store(str(cli.data_dir)).append([], purge=[gone.local_id])  # as a pass would
    got = complete(cli, "jobsyncd show ab")
    assert {v for _, v in got} == {a.local_id, b.local_id, "ab-77"}
    assert {v for _, v in complete(cli, "jobsyncd delete abc")} == {a.local_id}
    assert {v for _, v in complete(cli, "jobsyncd retry zz")} == {"zz-1"}
    assert {v for _, v in complete(cli, "jobsyncd update ABD")} == {b.local_id}


def test_completion_reads_the_store_a_data_dir_option_names_before_or_after_the_command(cli, tmp_path):
    other = tmp_path / "other"
    local_id = cli("--data-dir", str(other), "create", check=True).stdout.strip()
    prefix = local_id[:4]
    for words in (f"jobsyncd --data-dir {other} show {prefix}", f"jobsyncd show --data-dir {other} {prefix}"):
        assert [v for _, v in complete(cli, words)] == [local_id], words
    assert complete(cli, f"jobsyncd show {prefix}") == []


def test_completion_with_no_store_or_a_bad_config_offers_nothing_and_prints_no_error(cli):
    assert complete(cli, "jobsyncd show ab") == []
    assert complete(cli, "jobsyncd show ab", {"JOBSYNCD_CONFIG": "/nonexistent"}) == []


def test_audio_completes_file_names(cli):
    assert complete(cli, "jobsyncd create --audio mem") == [("file", "mem")]


def test_the_readme_says_how_to_enable_completion_in_bash_zsh_and_fish():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for shell in ("bash", "zsh", "fish"):
        assert f"_JOBSYNCD_COMPLETE={shell}_source" in readme


# ---- the help and the README say the same ----------------------------------------------------

COMMANDS = [
    ("create",), ("update",), ("delete",), ("list",), ("show",), ("retry",), ("sync",),
    ("daemon",), ("status",), ("compact",), ("demo",), ("config",), ("config", "show"),
    ("config", "check"), ("config", "init"),
]
README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_each_commands_help_has_an_example_and_its_options_are_in_the_readme(cli, command):
    text = run(cli, *command, "--help").stdout
    assert "Example:" in text and "jobsyncd " in text.split("Example:", 1)[1]
    for option in re.findall(r"^\s+(--[a-z][a-z-]+)", text, flags=re.M):
        if option != "--help":
            assert option in README, f"{' '.join(command)} {option} is not in the README"
    assert f"`{' '.join(command)}" in README or f"{' '.join(command)} [" in README


def test_the_main_help_lists_every_command_and_has_an_example(cli):
    text = run(cli, "--help").stdout
    for command in {c[0] for c in COMMANDS}:
        assert re.search(rf"^\s+{command}\s", text, flags=re.M), command
    assert "Example:" in text and "may also follow the command" in " ".join(text.split())


def test_the_readme_config_example_has_every_key_of_the_schema():
    from jobsyncd.config import SCHEMA

    block = README.split("```toml\n", 1)[1].split("```", 1)[0]
    for key in SCHEMA:
        assert re.search(rf"^#? ?{key.name} = ", block, flags=re.M), key.name
