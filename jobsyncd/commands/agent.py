"""The agent's own commands: sync, daemon, status, compact, demo."""

from __future__ import annotations

import sys
import time

import click

from .. import log
from ..cli import IntervalSeconds, global_options, pass_runtime, print_json
from ..runtime import Runtime


@click.command()
@global_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_runtime
def status(runtime: Runtime, as_json: bool) -> None:
    """Health of this agent (needs no server): counts per status, the oldest change not yet
    on the server, the daemon, the last pass.

    \b
    Example:
      jobsyncd status --json | jq .oldest_pending_age_seconds
    """
    from ..jobs import feed_report, status_report
    from ..state import read_last_pass, read_pull_state
    from ..wakeup import daemon_pid

    settings = runtime.settings
    report = status_report(
        runtime.store,
        settings.server_url,
        read_last_pass(settings.data_dir),
        daemon_pid(settings.data_dir),
    )
    report["feed"] = feed_report(read_pull_state(settings.data_dir), time.time())
    if as_json:
        print_json(report)
        return
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    click.echo(f"jobs:        {report['total']} ({counts})")
    age = report["oldest_pending_age_seconds"]
    click.echo(f"oldest change not on the server: {'none' if age is None else f'{age:.0f} s old'}")
    daemon = report["daemon"]
    click.echo(
        f"daemon:      {'running, pid ' + str(daemon['pid']) if daemon['running'] else 'not running'}"
    )
    last = report["last_pass"]
    if last:
        outcome = (
            "ok"
            if last.get("ok")
            else f"not ok (skipped: {last.get('skipped')})"
            if last.get("skipped")
            else "not ok"
        )
        click.echo(f"last pass:   {last.get('finished_at')} {outcome}")
    else:
        click.echo("last pass:   never")
    click.echo(f"server:      {report['server_url'] or 'not configured'}")
    feed = report["feed"]
    if feed["mode"] == "feed":
        age = feed["checkpoint_age_seconds"]
        when = "no checkpoint yet" if age is None else f"checkpoint {age:.0f} s old"
        click.echo(f"pull:        change feed ({when})")
    elif feed["mode"] == "listing":
        click.echo("pull:        whole listing (the server offers no change feed)")
    click.echo(f"data dir:    {report['data_dir']}")


@click.command()
@global_options
@pass_runtime
def compact(runtime: Runtime) -> None:
    """Rewrite the store to hold only live records (safe while a daemon runs).

    Also removes audio copies no job names once they are an hour old.

    \b
    Example:
      jobsyncd compact
    """
    import time

    from ..audio import sweep_orphans

    with runtime.store.locked():
        before, after = runtime.store.compact()
        referenced = {j.audio_file for j in runtime.store.jobs.values() if j.audio_file}
        removed, problems = sweep_orphans(runtime.store.data_dir, referenced, time.time())
    for problem in problems:
        log.warning(problem)
    log.info(f"compacted {runtime.store.path}: {before} records -> {after}")
    extra = f"; removed {removed} audio file(s) no job names" if removed else ""
    click.echo(f"{before} -> {after} records{extra}")


@click.command()
@global_options
@click.option("--json", "as_json", is_flag=True, help="Print the pass summary as JSON.")
@click.option(
    "--force-delete",
    is_flag=True,
    help="Answer the deletion guard: the server really was emptied; remove the jobs here too.",
)
@click.option(
    "--reupload",
    is_flag=True,
    help="Answer the deletion guard the other way: the server was restored from a backup; "
    "synced jobs it no longer has go back to pending and are created again.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="With a daemon running: wait for its next pass and exit as that pass did.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what a pass would do (GET requests only, nothing written), one action a line.",
)
@pass_runtime
def sync(
    runtime: Runtime, as_json: bool, force_delete: bool, reupload: bool, wait: bool, dry_run: bool
) -> None:
    """Run one sync pass now and exit 0, 1, 75 or 77 (for cron and scripts).

    With a daemon running, the pass is handed to it and sync exits 0 at once; with --wait it
    waits for the daemon's first pass that starts after the request (at most 3 x the daemon's
    interval, else exit 75) and prints and exits as that pass did. -q prints nothing for a
    pass that went well.

    --dry-run is never handed to a daemon: it makes GET requests only and writes nothing, and
    prints one line per action a pass would take (create, update with the fields, delete, pull,
    remove-local, reupload), or JSON Lines with --json.

    \b
    Example:
      */5 * * * * jobsyncd -q sync        (a crontab line that mails only trouble)
      jobsyncd sync --dry-run --json      (what the next pass would do, for a script)
    """
    if force_delete and reupload:
        raise click.UsageError("--force-delete and --reupload are exclusive: choose one")
    if dry_run:
        if wait:
            raise click.UsageError("--dry-run runs here; it cannot --wait for a daemon")
        from ..dryrun import run_dry_run_command

        sys.exit(
            run_dry_run_command(
                runtime.settings, runtime.store, as_json, force_delete=force_delete, reupload=reupload
            )
        )
    from ..runner import run_sync_command

    code = run_sync_command(
        runtime.settings,
        runtime.store,
        as_json=as_json,
        force_delete=force_delete,
        quiet=runtime.quiet,
        wait=wait,
        reupload=reupload,
    )
    sys.exit(code)


@click.command()
@global_options
@click.option(
    "--interval",
    type=IntervalSeconds(),
    metavar="SECONDS",
    help="Seconds between scheduled passes.",
)
@pass_runtime
def daemon(runtime: Runtime, interval: float | None) -> None:
    """Run in the foreground, syncing on a schedule and on request (never forks).

    A pass at start, every interval, and within a second of a create, update, delete, retry or
    sync. SIGHUP reloads the config, SIGTERM stops. The log has a line per pass that changed
    something or failed; -v logs every pass.

    \b
    Example:
      jobsyncd -v daemon --interval 30
    """
    from ..daemon import run_daemon

    sys.exit(run_daemon(runtime, interval))


@click.command()
@global_options
def demo() -> None:
    """The whole loop end to end against a local server, in a temporary directory.

    Touches none of your data and leaves no process behind.

    \b
    Example:
      jobsyncd demo
    """
    from ..demo import run_demo

    sys.exit(run_demo())


COMMANDS = {"sync": sync, "daemon": daemon, "status": status, "compact": compact, "demo": demo}
