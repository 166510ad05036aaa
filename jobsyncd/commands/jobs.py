"""The job commands: create, update, delete, list, show, retry, and the completion of JOB."""

from __future__ import annotations

import json
import operator
import sys
from typing import Any

import click

from ..cli import global_options, pass_runtime, print_job, print_json
from ..errors import JobsyncdError, UsageProblem
from ..model import STATUSES, Job
from ..runtime import Runtime


def _parse_metas(pairs: tuple[str, ...]) -> dict[str, Any]:
    from ..jobs import parse_meta_args

    return parse_meta_args(pairs)


# ---- list: search and the ids its table shows ----------------------------------------------
def _search_values(value: Any) -> Any:
    """Every searchable string of a metadata value: strings as they are, other scalars as
    their JSON text, containers by their values (keys are not searched)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, str):
            yield item
        else:
            yield json.dumps(item)


def matches_search(job: Job, needle: str) -> bool:
    """`list --search`: the text or any metadata value contains `needle`, ignoring case."""
    needle = needle.casefold()
    if needle in job.text.casefold():
        return True
    return any(needle in text.casefold() for text in _search_values(job.metadata))


def display_ids(jobs: list[Job], shown: list[Job]) -> dict[str, tuple[str, str]]:
    """For `list`'s table: each shown job's local id cut as short as stays unique (at least
    8 characters) and its server id in full, or "" when `show` would not resolve it to this
    job (shared, another job's local id or prefix, or characters JOB cannot hold)."""
    import bisect

    ids = sorted(j.local_id for j in jobs)
    server_count: dict[str, int] = {}
    for j in jobs:
        if j.server_id is not None:
            server_count[j.server_id] = server_count.get(j.server_id, 0) + 1
    out = {}
    for job in shown:
        i = bisect.bisect_left(ids, job.local_id)
        need = 8
        for other in ids[max(i - 1, 0) : i + 2]:
            # Most neighbours differ in their first 8 characters: no prefix to measure then.
            if other != job.local_id and other[:8] == job.local_id[:8]:
                need = max(need, len(_common_prefix(other, job.local_id)) + 1)
        while job.local_id[:need] in server_count and need < len(job.local_id):
            need += 1  # a prefix that is also a server id would be ambiguous
        sid = job.server_id or ""
        if sid and not _server_id_resolves(sid, job.local_id, ids, server_count):
            sid = ""
        out[job.local_id] = (job.local_id[:need], sid)
    return out


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _server_id_resolves(sid: str, own: str, ids: list[str], counts: dict[str, int]) -> bool:
    import bisect

    if counts.get(sid, 0) != 1 or any(c in sid for c in '"\\\n') or not sid.isprintable():
        return False
    low = sid.lower()
    if low in ids and low != own:
        return False  # an exact local_id wins over a server_id
    if len(low) >= 6:
        i = bisect.bisect_left(ids, low)
        while i < len(ids) and ids[i].startswith(low):
            if ids[i] != own:
                return False
            i += 1
    return True


# ---- completion ----------------------------------------------------------------------------


def _store_ids(ctx: click.Context) -> dict[str, str | None]:
    """local_id -> server_id of the live jobs, read from the store file without folding it."""
    import re

    from ..config import load_settings
    from ..store import STORE_NAME

    root = ctx.find_root()
    late = ctx.meta  # global options given after the command (shared by the contexts)
    settings = load_settings(
        late.get("jobsyncd.config_file") or root.params.get("config_file"),
        {"data_dir": late.get("jobsyncd.data_dir") or root.params.get("data_dir")},
    )
    with open(f"{settings.data_dir}/{STORE_NAME}", "rb") as fh:
        data = fh.read()
    line = re.compile(
        rb'^\{"local_id":"([^"]{36})","(?:server_id":(null|"(?:[^"\\]|\\.)*")|(purged)")', re.M
    )
    ids: dict[str, str | None] = {}
    for m in line.finditer(data):
        local_id = m.group(1).decode()
        if m.group(3):
            ids.pop(local_id, None)
        else:
            ids[local_id] = json.loads(m.group(2))
    return ids


def complete_job(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """JOB completes to the local_ids and server_ids that start with what was typed."""
    try:
        ids = _store_ids(ctx)
    except Exception:  # completion never prints an error into the user's shell
        return []
    low = incomplete.lower()
    out = sorted(i for i in ids if i.startswith(low))
    out += sorted(s for s in ids.values() if s and s.startswith(incomplete))
    return out


def _complete_file(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    from click.shell_completion import CompletionItem

    return [CompletionItem(incomplete, type="file")]


# ---- text from an option, a file, stdin or an editor ----------------------------------------


def _one_text_source(text: str | None, text_file: str | None, edit: bool) -> None:
    given = [name for name, v in (("--text", text), ("--text-file", text_file)) if v is not None]
    if edit:
        given.append("--edit")
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} cannot be used together")


def read_text(text: str | None, text_file: str | None, edit: bool, current: str) -> str | None:
    """The new text from `--text`, `--text-file` (`-` for stdin) or `--edit`, or None."""
    _one_text_source(text, text_file, edit)
    if text_file is not None:
        return _read_text_file(text_file)
    if edit:
        return _edit(current)
    return text


def _read_text_file(path: str) -> str:
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as fh:
                raw = fh.read()
    except OSError as exc:
        raise UsageProblem(f"cannot read text file {path}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = "stdin" if path == "-" else path
        raise UsageProblem(f"the text from {where} is not UTF-8 (byte {exc.start})") from None


def _edit(current: str) -> str:
    try:
        edited = click.edit(current, require_save=True, extension=".txt")
    except click.ClickException as exc:
        raise JobsyncdError(f"{exc.format_message()}; nothing changed") from None
    except UnicodeDecodeError as exc:
        raise UsageProblem(f"the edited text is not UTF-8 (byte {exc.start})") from None
    if edited is not None and edited.endswith("\n"):
        edited = edited[:-1]  # the newline every editor adds at the end of the file
    if edited is None or edited == current:
        raise JobsyncdError("the text was left unchanged; nothing changed")
    return edited


TEXT_FILE_HELP = "Read the text from FILE (- for stdin), as UTF-8, unchanged."
EDIT_HELP = "Write the text in $VISUAL, else $EDITOR (one trailing newline is removed)."


# ---- the commands ----------------------------------------------------------------------------


@click.command()
@global_options
@click.option("--text", help="The job's text.")
@click.option("--text-file", metavar="FILE", help=TEXT_FILE_HELP)
@click.option("--edit", is_flag=True, help=EDIT_HELP)
@click.option(
    "--audio",
    "audio_src",
    metavar="FILE",
    shell_complete=_complete_file,
    help="An audio file to copy into the job (yours is never moved).",
)
@click.option(
    "--meta",
    "metas",
    multiple=True,
    metavar="KEY=VALUE",
    help="Metadata (VALUE as JSON when it parses, else a string).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@pass_runtime
def create(
    runtime: Runtime,
    text: str | None,
    text_file: str | None,
    edit: bool,
    audio_src: str | None,
    metas: tuple[str, ...],
    as_json: bool,
) -> None:
    """Save a new pending job (and ask a running daemon to sync now).

    \b
    Example:
      arecord memo.wav; whisper memo.wav | jobsyncd create --text-file - --audio memo.wav
    """
    from ..jobs import create_job

    metadata = _parse_metas(metas)
    text = read_text(text, text_file, edit, "")
    job = create_job(runtime.store, text, audio_src, metadata)
    runtime.wake_daemon()
    if as_json:
        print_json(job.public())
    else:
        click.echo(job.local_id)


@click.command()
@global_options
@click.argument("job_ref", metavar="JOB", shell_complete=complete_job)
@click.option("--text", help="New text.")
@click.option("--text-file", metavar="FILE", help=TEXT_FILE_HELP)
@click.option("--edit", is_flag=True, help=EDIT_HELP + " Starts from the current text.")
@click.option(
    "--audio",
    "audio_src",
    metavar="FILE",
    shell_complete=_complete_file,
    help="Replace the job's audio with a copy of FILE.",
)
@click.option("--no-audio", is_flag=True, help="Remove the job's audio (here and on the server).")
@click.option("--meta", "metas", multiple=True, metavar="KEY=VALUE", help="Set a metadata key.")
@click.option("--unset-meta", "unset", multiple=True, metavar="KEY", help="Remove a metadata key.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@pass_runtime
def update(
    runtime: Runtime,
    job_ref: str,
    text: str | None,
    text_file: str | None,
    edit: bool,
    audio_src: str | None,
    no_audio: bool,
    metas: tuple[str, ...],
    unset: tuple[str, ...],
    as_json: bool,
) -> None:
    """Change a job locally and mark it pending (an unchanged job stays as it is).

    \b
    Example:
      jobsyncd update 3f2a9c1e --edit --meta reviewed=true
    """
    from ..jobs import check_meta_not_conflicting, update_job

    if (
        text is None
        and text_file is None
        and not edit
        and audio_src is None
        and not no_audio
        and not metas
        and not unset
    ):
        raise click.UsageError(
            "give at least one of --text, --text-file, --edit, --audio, --no-audio, "
            "--meta, --unset-meta"
        )
    if audio_src is not None and no_audio:
        raise click.UsageError("--audio and --no-audio cannot be used together")
    set_meta = _parse_metas(metas)
    check_meta_not_conflicting(set_meta, list(unset))
    _one_text_source(text, text_file, edit)
    edited_from = runtime.store.find(job_ref).text if edit else None
    new_text = read_text(text, text_file, edit, edited_from or "")
    job, changed = update_job(
        runtime.store,
        job_ref,
        new_text,
        audio_src,
        set_meta,
        list(unset),
        remove_audio=no_audio,
        edited_from=edited_from,
    )
    if changed:
        runtime.wake_daemon()
    if as_json:
        print_json(job.public())
    else:
        click.echo(job.local_id if changed else f"{job.local_id} (unchanged)")


@click.command()
@global_options
@click.argument("job_refs", metavar="JOB...", nargs=-1, required=True, shell_complete=complete_job)
@pass_runtime
def delete(runtime: Runtime, job_refs: tuple[str, ...]) -> None:
    """Mark jobs for deletion; the next pass deletes them on the server and here.

    Every JOB is resolved first: one that matches no job (or several) changes nothing.

    \b
    Example:
      jobsyncd delete 3f2a9c1e 7b01d4aa
    """
    from ..jobs import delete_jobs

    jobs = delete_jobs(runtime.store, list(job_refs))
    runtime.wake_daemon()
    for job in jobs:
        click.echo(job.local_id)


@click.command("list")
@global_options
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="Only jobs in this sync status (repeatable).",
)
@click.option(
    "--search",
    metavar="TEXT",
    help="Only jobs whose text or a metadata value holds TEXT (any case).",
)
@click.option("--reverse", is_flag=True, help="Newest first.")
@click.option("--limit", type=click.IntRange(min=0), help="Only the first N (after the order).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (JSON Lines).")
@pass_runtime
def list_(
    runtime: Runtime,
    statuses: tuple[str, ...],
    search: str | None,
    reverse: bool,
    limit: int | None,
    as_json: bool,
) -> None:
    """List jobs, oldest first (by created_at). Every id shown is one `show` accepts.

    \b
    Example:
      jobsyncd list --search smith --reverse --limit 10
    """
    every = list(runtime.store.load().values())
    # The store folds in creation order already; a stable sort by created_at is nearly free
    # then, and puts jobs pulled from the server (their own created_at) in their place.
    every.sort(key=operator.attrgetter("created_at"), reverse=reverse)
    jobs = every
    if statuses:
        jobs = [j for j in jobs if j.sync_status in statuses]
    if search is not None:
        jobs = [j for j in jobs if matches_search(j, search)]
    if limit is not None:
        jobs = jobs[:limit]
    if as_json:
        _print_json_lines(jobs)
    elif not jobs:
        click.echo("no jobs")
    else:
        _print_table(every, jobs)


def _print_json_lines(jobs: list[Job]) -> None:
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    out = sys.stdout
    for start in range(0, len(jobs), 1000):
        chunk = [dumps(job.public()) for job in jobs[start : start + 1000]]
        out.write("\n".join(chunk) + "\n")
    out.flush()


def _cell(text: str, width: int) -> str:
    head = text[:width]  # only what is shown is cleaned (a text may be a megabyte long)
    if not head.isprintable():
        head = "".join(c if c.isprintable() else " " for c in head)
    return head if len(text) <= width else head[: width - 1] + "…"


def _print_table(every: list[Job], jobs: list[Job]) -> None:
    ids = display_ids(every, jobs)
    lid_w = max(len(lid) for lid, _ in ids.values()) + 2
    sid_w = max([len("SERVER_ID")] + [len(sid) for _, sid in ids.values()]) + 2
    lines = [
        f"{'LOCAL_ID':{lid_w}}{'STATUS':18}{'SERVER_ID':{sid_w}}{'UPDATED (UTC)':22}{'AUDIO':7}TEXT"
    ]
    for job in jobs:
        lid, sid = ids[job.local_id]
        updated = job.updated_at[:19] + "Z"
        audio = "yes" if job.audio_file else "-"
        lines.append(
            f"{lid:{lid_w}}{job.sync_status:18}{(sid or '-'):{sid_w}}{updated:22}{audio:7}"
            f"{_cell(job.text, 40)}"
        )
        if len(lines) >= 1000:  # written in blocks: one echo (and flush) per line cost 17 ms
            click.echo("\n".join(lines))
            lines = []
    if lines:
        click.echo("\n".join(lines))


@click.command()
@global_options
@click.argument("job_ref", metavar="JOB", shell_complete=complete_job)
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@pass_runtime
def show(runtime: Runtime, job_ref: str, as_json: bool) -> None:
    """Show one job.

    \b
    Example:
      jobsyncd show 3f2a9c1e --json | jq .sync_status
    """
    print_job(runtime.store.find(job_ref), as_json)


@click.command()
@global_options
@click.argument("job_refs", metavar="[JOB]...", nargs=-1, shell_complete=complete_job)
@click.option("--all", "all_", is_flag=True, help="Retry every failed job; prints how many.")
@pass_runtime
def retry(runtime: Runtime, job_refs: tuple[str, ...], all_: bool) -> None:
    """Put failed jobs back where they were going, with retry_count 0.

    Every JOB is resolved and checked first: one that is not failed changes nothing.

    \b
    Example:
      jobsyncd retry --all
    """
    from ..jobs import retry_all, retry_jobs

    if bool(job_refs) == bool(all_):
        raise click.UsageError("give JOB... or --all (not both)")
    if all_:
        click.echo(str(retry_all(runtime.store)))
    else:
        for job in retry_jobs(runtime.store, list(job_refs)):
            click.echo(job.local_id)
    runtime.wake_daemon()


COMMANDS = {
    "create": create,
    "update": update,
    "delete": delete,
    "list": list_,
    "show": show,
    "retry": retry,
}
