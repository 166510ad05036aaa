"""The `jobsyncd` command line: parse, call one function, print.

Every failure becomes one `jobsyncd: error:` line and the contract's exit code here, in `main`.
Heavy modules (requests, the sync pass, the daemon) are imported inside the commands that need
them, so local commands stay fast.
"""

from __future__ import annotations

import json
import operator
import os
import sys
from typing import Any

import click

from . import __version__, log
from .errors import JobsyncdError
from .model import STATUSES, Job

_state = {"verbose": 0}


class App:
    """What the global options decide, resolved lazily (a config error only where it matters)."""

    def __init__(
        self,
        config_file: str | None,
        data_dir: str | None,
        server: str | None,
        verbose: int = 0,
        quiet: bool = False,
    ) -> None:
        self.config_file = config_file
        self.overrides = {"data_dir": data_dir, "server_url": server}
        self.verbose = verbose
        self.quiet = quiet
        self._settings = None
        self._store = None

    def set_verbosity(self, verbose: int, quiet: bool) -> None:
        self.verbose, self.quiet = verbose, quiet
        _state["verbose"] = verbose
        log.configure(verbose=verbose, quiet=quiet)

    @property
    def settings(self):
        if self._settings is None:
            from .config import load_settings

            self._settings = load_settings(self.config_file, self.overrides)
            for message in self._settings.warnings:
                log.warning(message)
        return self._settings

    @property
    def store(self):
        if self._store is None:
            from .store import Store, prepare_data_dir

            prepare_data_dir(self.settings.data_dir)
            self._store = Store(self.settings.data_dir, warn=log.warning)
        return self._store

    def wake_daemon(self) -> None:
        # Only when a daemon's socket is there: importing socket costs start-up time.
        if os.path.exists(os.path.join(self.settings.data_dir, "daemon.sock")):
            from .wakeup import request_sync

            request_sync(self.settings.data_dir)


pass_app = click.make_pass_decorator(App)


def _late_option(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the command (`jobsyncd sync -q`): same effect as before it.

    The App's settings are resolved lazily, inside the command, so nothing has read them yet.
    """
    app = ctx.find_object(App)
    if app is None or value in (None, False, 0):
        return
    if param.name in ("config_file",):
        app.config_file = value
    elif param.name == "data_dir":
        app.overrides["data_dir"] = value
    elif param.name == "server":
        app.overrides["server_url"] = value
    elif param.name == "verbose":
        app.set_verbosity(app.verbose + value, app.quiet)
    elif param.name == "quiet":
        app.set_verbosity(app.verbose, True)


def global_options(command: Any) -> Any:
    """Accept the global options after the command too (contract section 2: `jobsyncd sync -q`
    is `jobsyncd -q sync`); hidden in the command's own help, which says so."""
    late = {"hidden": True, "expose_value": False, "callback": _late_option}
    command = click.option("-q", "--quiet", is_flag=True, **late)(command)
    command = click.option("-v", "--verbose", count=True, **late)(command)
    command = click.option("--server", **late)(command)
    command = click.option("--data-dir", **late)(command)
    return click.option("--config", "config_file", **late)(command)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def _print_job(job: Job, as_json: bool) -> None:
    if as_json:
        _print_json(job.public())
        return
    for key, value in job.public().items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        elif value is None:
            value = "-"
        click.echo(f"{key + ':':22}{value}")


def _parse_metas(pairs: tuple[str, ...]) -> dict[str, Any]:
    from .jobs import parse_meta_args

    return parse_meta_args(pairs)


class _IntervalSeconds(click.ParamType):
    """`daemon --interval`: a finite number in interval_seconds' range, else a usage error."""

    name = "seconds"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not 1 <= seconds <= 86400:  # also false for NaN
            self.fail(f"{value} is not a number of seconds from 1 to 86400", param, ctx)
        return seconds


def _one_line(message: str) -> str:
    """An error message as one line: line breaks and other control characters (a user's
    argument may hold any) are shown escaped, never acted on by the terminal."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else (" " if c == "\n" else repr(c)[1:-1]) for c in message)


def _not_utf8_argument(argv: list[str]) -> str | None:
    """The first argument that is not valid UTF-8 (Python hands such bytes over as lone
    surrogates, which no JSON output or store line could hold), else None."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", metavar="FILE", help="Config file (env JOBSYNCD_CONFIG).")
@click.option("--data-dir", metavar="DIR", help="Data dir (env JOBSYNCD_DATA_DIR).")
@click.option("--server", metavar="URL", help="Server base URL (env JOBSYNCD_SERVER_URL).")
@click.option("-v", "--verbose", count=True, help="More output: -v info, -vv debug and tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.version_option(
    __version__, "--version", prog_name="jobsyncd", message="%(prog)s %(version)s"
)
@click.pass_context
def cli(ctx: click.Context, config_file, data_dir, server, verbose, quiet) -> None:
    """jobsyncd: an offline-first sync agent for jobs.

    Jobs are saved locally first and pushed to the job server by `jobsyncd sync` or a running
    `jobsyncd daemon`. JOB is a local_id, a server_id, or a unique local_id prefix (>= 6 chars).
    """
    ctx.obj = App(config_file, data_dir, server)
    ctx.obj.set_verbosity(verbose, quiet)


@cli.command()
@global_options
@click.option("--text", help="The job's text.")
@click.option("--audio", "audio_src", metavar="FILE", help="An audio file to copy into the job.")
@click.option(
    "--meta",
    "metas",
    multiple=True,
    metavar="KEY=VALUE",
    help="Metadata (VALUE as JSON when it parses).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@pass_app
def create(app: App, text, audio_src, metas, as_json) -> None:
    """Save a new pending job (and ask a running daemon to sync now)."""
    from .jobs import create_job

    metadata = _parse_metas(metas)
    job = create_job(app.store, text, audio_src, metadata)
    app.wake_daemon()
    if as_json:
        _print_json(job.public())
    else:
        click.echo(job.local_id)


@cli.command()
@global_options
@click.argument("job_ref", metavar="JOB")
@click.option("--text", help="New text.")
@click.option(
    "--audio", "audio_src", metavar="FILE", help="Replace the job's audio with a copy of FILE."
)
@click.option("--meta", "metas", multiple=True, metavar="KEY=VALUE", help="Set a metadata key.")
@click.option("--unset-meta", "unset", multiple=True, metavar="KEY", help="Remove a metadata key.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@pass_app
def update(app: App, job_ref, text, audio_src, metas, unset, as_json) -> None:
    """Change a job locally and mark it pending."""
    from .jobs import check_meta_not_conflicting, update_job

    if text is None and audio_src is None and not metas and not unset:
        raise click.UsageError("give at least one of --text, --audio, --meta, --unset-meta")
    set_meta = _parse_metas(metas)
    check_meta_not_conflicting(set_meta, list(unset))
    job, changed = update_job(app.store, job_ref, text, audio_src, set_meta, list(unset))
    if changed:
        app.wake_daemon()
    if as_json:
        _print_json(job.public())
    else:
        click.echo(job.local_id if changed else f"{job.local_id} (unchanged)")


@cli.command()
@global_options
@click.argument("job_ref", metavar="JOB")
@pass_app
def delete(app: App, job_ref) -> None:
    """Mark a job for deletion; the next pass deletes it on the server and here."""
    from .jobs import delete_job

    job = delete_job(app.store, job_ref)
    app.wake_daemon()
    click.echo(job.local_id)


@cli.command("list")
@global_options
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="Only jobs in this sync status (repeatable).",
)
@click.option("--limit", type=click.IntRange(min=0), help="The N oldest.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (JSON Lines).")
@pass_app
def list_(app: App, statuses, limit, as_json) -> None:
    """List jobs, oldest first."""
    jobs = list(app.store.load().values())
    # The store folds in creation order already; a stable sort by created_at is nearly free
    # then, and puts jobs pulled from the server (their own created_at) in their place.
    jobs.sort(key=operator.attrgetter("created_at"))
    if statuses:
        jobs = [j for j in jobs if j.sync_status in statuses]
    if limit is not None:
        jobs = jobs[:limit]
    if as_json:
        dumps = json.JSONEncoder(ensure_ascii=False).encode
        out = sys.stdout
        chunk = []
        for job in jobs:
            chunk.append(dumps(job.public()))
            if len(chunk) >= 1000:
                out.write("\n".join(chunk) + "\n")
                chunk = []
        if chunk:
            out.write("\n".join(chunk) + "\n")
        out.flush()
        return
    if not jobs:
        click.echo("no jobs")
        return
    click.echo(f"{'LOCAL_ID':10}{'STATUS':18}{'SERVER_ID':14}{'UPDATED':22}TEXT")
    for job in jobs:
        text = job.text.replace("\n", " ")
        text = text if len(text) <= 40 else text[:39] + "…"
        sid = (job.server_id or "-")[:12]
        click.echo(
            f"{job.local_id[:8]:10}{job.sync_status:18}{sid:14}{job.updated_at[:19]:22}{text}"
        )


@cli.command()
@global_options
@click.argument("job_ref", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@pass_app
def show(app: App, job_ref, as_json) -> None:
    """Show one job."""
    _print_job(app.store.find(job_ref), as_json)


@cli.command()
@global_options
@click.argument("job_ref", metavar="JOB", required=False)
@click.option("--all", "all_", is_flag=True, help="Retry every failed job; prints how many.")
@pass_app
def retry(app: App, job_ref, all_) -> None:
    """Put failed jobs back where they were going, with retry_count 0."""
    from .jobs import retry_all, retry_job

    if bool(job_ref) == bool(all_):
        raise click.UsageError("give JOB or --all (not both)")
    if all_:
        count = retry_all(app.store)
        click.echo(str(count))
    else:
        job = retry_job(app.store, job_ref)
        click.echo(job.local_id)
    app.wake_daemon()


@cli.command()
@global_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_app
def status(app: App, as_json) -> None:
    """Health of this agent (needs no server)."""
    from .jobs import status_report
    from .state import read_last_pass
    from .wakeup import daemon_pid

    settings = app.settings
    report = status_report(
        app.store,
        settings.server_url,
        read_last_pass(settings.data_dir),
        daemon_pid(settings.data_dir),
    )
    if as_json:
        _print_json(report)
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
    click.echo(f"data dir:    {report['data_dir']}")


@cli.command()
@global_options
@pass_app
def compact(app: App) -> None:
    """Rewrite the store to hold only live records (safe while a daemon runs)."""
    import time

    from .audio import sweep_orphans

    with app.store.locked():
        before, after = app.store.compact()
        referenced = {j.audio_file for j in app.store.jobs.values() if j.audio_file}
        removed, problems = sweep_orphans(app.store.data_dir, referenced, time.time())
    for problem in problems:
        log.warning(problem)
    log.info(f"compacted {app.store.path}: {before} records -> {after}")
    extra = f"; removed {removed} audio file(s) no job names" if removed else ""
    click.echo(f"{before} -> {after} records{extra}")


@cli.command()
@global_options
@click.option("--json", "as_json", is_flag=True, help="Print the pass summary as JSON.")
@click.option(
    "--force-delete", is_flag=True, help="Remove local jobs even if the server listing is empty."
)
@pass_app
def sync(app: App, as_json, force_delete) -> None:
    """Run one sync pass now (or hand it to a running daemon) and exit."""
    from .runner import run_sync_command

    code = run_sync_command(
        app.settings, app.store, as_json=as_json, force_delete=force_delete, quiet=app.quiet
    )
    sys.exit(code)


@cli.command()
@global_options
@click.option(
    "--interval",
    type=_IntervalSeconds(),
    metavar="SECONDS",
    help="Seconds between scheduled passes.",
)
@pass_app
def daemon(app: App, interval) -> None:
    """Run in the foreground, syncing on a schedule and on request."""
    from .daemon import run_daemon

    sys.exit(run_daemon(app, interval))


@cli.command()
@global_options
def demo() -> None:
    """The whole loop end to end against a local server, in a temporary directory."""
    from .demo import run_demo

    sys.exit(run_demo())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    bad = _not_utf8_argument(args)
    if bad is not None:
        log.error(f"an argument is not valid UTF-8: {bad!r}")
        sys.exit(2)
    try:
        code = cli.main(args=args, prog_name="jobsyncd", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.UsageError as exc:
        message = exc.format_message()
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `jobsyncd`: not the whole help
            message = "give a command, e.g. `jobsyncd status`"
        if exc.ctx is not None and exc.ctx.command_path:
            message = f"{message} (see '{exc.ctx.command_path} --help')"
        log.error(_one_line(message))
        code = 2
    except click.Abort:
        log.error("aborted")
        code = 130
    except JobsyncdError as exc:
        if _state["verbose"] >= 2:
            import traceback

            traceback.print_exc()
        log.error(_one_line(str(exc)))
        code = exc.exit_code
    except click.ClickException as exc:
        log.error(_one_line(exc.format_message()))
        code = exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        code = 130
    except BrokenPipeError:
        # The reader of our output went away (`jobsyncd list | head`): not an error of ours.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        code = 0
    except OSError as exc:
        # A file or directory the system refused that no layer above named: still one line.
        if _state["verbose"] >= 2:
            import traceback

            traceback.print_exc()
        where = f" {exc.filename}" if exc.filename else ""
        log.error(_one_line(f"cannot use{where}: {exc.strerror or exc}"))
        code = 1
    except Exception as exc:  # a bug: say so in one line, the traceback only with -vv
        if _state["verbose"] >= 2:
            import traceback

            traceback.print_exc()
        log.error(_one_line(f"unexpected {type(exc).__name__}: {exc} (run with -vv for details)"))
        code = 1
    sys.exit(code or 0)
