"""The `jobsyncd` command line: parse, call one function, print.

Every failure becomes one `jobsyncd: error:` line and the contract's exit code here, in `main`.
Heavy modules (requests, the sync pass, the daemon) are imported inside the commands that need
them, so local commands stay fast.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__, log
from .errors import JobsyncdError
from .model import Job
from .runtime import Runtime

if TYPE_CHECKING:
    _FloatParamType = click.ParamType[float]
else:  # click before 8.2 (setup.cfg allows 8.1) has no subscriptable ParamType at run time
    _FloatParamType = click.ParamType

_Fn = TypeVar("_Fn", bound=Callable[..., Any])

EPILOG = (
    "Exit codes: 0 done, 1 failed, 2 usage, 75 try later, 77 credentials refused, "
    "78 configuration. Shell completion and daily use: see the README."
)


pass_runtime = click.make_pass_decorator(Runtime)


def late_option(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the command (`jobsyncd sync -q`): same effect as before it.

    The Runtime's settings are resolved lazily, inside the command, so nothing has read them yet.
    """
    if value in (None, False, 0):
        return
    ctx.meta[f"jobsyncd.{param.name}"] = value  # for shell completion, which runs no command
    runtime = ctx.find_object(Runtime)
    if runtime is None:
        return
    if param.name in ("config_file",):
        runtime.config_file = value
    elif param.name == "data_dir":
        runtime.overrides["data_dir"] = value
    elif param.name == "server":
        runtime.overrides["server_url"] = value
    elif param.name == "verbose":
        runtime.set_verbosity(runtime.verbose + value, runtime.quiet)
    elif param.name == "quiet":
        runtime.set_verbosity(runtime.verbose, True)


def global_options(command: _Fn) -> _Fn:
    """Accept the global options after the command too (contract section 2: `jobsyncd sync -q`
    is `jobsyncd -q sync`); hidden in the command's own help, which says so."""
    late = partial(click.option, hidden=True, expose_value=False, callback=late_option)
    command = late("-q", "--quiet", is_flag=True)(command)
    command = late("-v", "--verbose", count=True)(command)
    if not any(
        "--server" in getattr(p, "opts", ()) for p in getattr(command, "__click_params__", ())
    ):
        command = late("--server")(command)
    command = late("--data-dir")(command)
    return late("--config", "config_file")(command)


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def print_job(job: Job, as_json: bool) -> None:
    if as_json:
        print_json(job.public())
        return
    for key, value in job.public().items():
        shown = value
        if isinstance(value, (dict, list)):
            shown = json.dumps(value, ensure_ascii=False)
        elif value is None:
            shown = "-"
        click.echo(f"{key + ':':22}{shown}")


class IntervalSeconds(_FloatParamType):
    """`daemon --interval`: a finite number in interval_seconds' range, else a usage error."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
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


class _LazyGroup(click.Group):
    """Each command's module is imported only when that command runs (or for --help): a
    `jobsyncd create` never pays for the config or daemon commands' imports."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = COMMANDS.get(name)
        if module is None:
            return None
        import importlib

        command: click.Command = importlib.import_module(f"jobsyncd.commands.{module}").COMMANDS[
            name
        ]
        return command


# command -> its module under jobsyncd/commands/, in the order --help lists them
COMMANDS = {
    "create": "jobs",
    "update": "jobs",
    "delete": "jobs",
    "list": "jobs",
    "show": "jobs",
    "retry": "jobs",
    "sync": "agent",
    "daemon": "agent",
    "status": "agent",
    "compact": "agent",
    "config": "config",
    "demo": "agent",
}


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.option("--config", "config_file", metavar="FILE", help="Config file (env JOBSYNCD_CONFIG).")
@click.option("--data-dir", metavar="DIR", help="Data dir (env JOBSYNCD_DATA_DIR).")
@click.option("--server", metavar="URL", help="Server base URL (env JOBSYNCD_SERVER_URL).")
@click.option("-v", "--verbose", count=True, help="More output: -v info, -vv debug and tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.version_option(
    __version__, "--version", prog_name="jobsyncd", message="%(prog)s %(version)s"
)
@click.pass_context
def cli(
    ctx: click.Context,
    config_file: str | None,
    data_dir: str | None,
    server: str | None,
    verbose: int,
    quiet: bool,
) -> None:
    """jobsyncd: an offline-first sync agent for jobs.

    Jobs are saved locally first and pushed to the job server by `jobsyncd sync` or a running
    `jobsyncd daemon`. JOB is a local_id, a server_id, or a unique local_id prefix (>= 6
    characters). Global options may also follow the command (`jobsyncd sync -q`).

    \b
    Example:
      jobsyncd create --text "Dictation 42" --audio memo.wav --meta patient=1234
    """
    # main() passes its Runtime in (to read -vv after the command failed); a caller of the
    # group itself gets a fresh one.
    runtime = ctx.ensure_object(Runtime)
    runtime.config_file = config_file
    runtime.overrides.update(data_dir=data_dir, server_url=server)
    runtime.set_verbosity(verbose, quiet)


def _usage_message(exc: click.UsageError) -> str:
    message = exc.format_message()
    if type(exc).__name__ == "NoArgsIsHelpError":  # plain `jobsyncd`: not the whole help
        message = "give a command, e.g. `jobsyncd status`"
    if exc.ctx is not None and exc.ctx.command_path:
        message = f"{message} (see '{exc.ctx.command_path} --help')"
    return message


def _traceback_with_vv(runtime: Runtime) -> None:
    """The traceback of the exception being handled, on stderr, only with -vv."""
    if runtime.verbose >= 2:
        import traceback

        traceback.print_exc()


def entry() -> None:
    """The `jobsyncd` command: main() in a process of its own, which then exits at once."""
    try:
        main()
    finally:
        # What is left is freed with the process: without this, the interpreter's shutdown
        # has the cyclic collector walk every object (modules, classes, a folded store) once
        # more, 40-50 ms of a 250 ms command. Objects still go by reference counting at
        # shutdown (files are flushed and closed); only cycles are left to the exit.
        gc.freeze()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    bad = _not_utf8_argument(args)
    if bad is not None:
        log.error(f"an argument is not valid UTF-8: {bad!r}")
        sys.exit(2)
    runtime = Runtime()
    try:
        code = cli.main(args=args, prog_name="jobsyncd", standalone_mode=False, obj=runtime)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.UsageError as exc:
        log.error(_one_line(_usage_message(exc)))
        code = 2
    except click.Abort:
        log.error("aborted")
        code = 130
    except JobsyncdError as exc:
        _traceback_with_vv(runtime)
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
        _traceback_with_vv(runtime)
        where = f" {exc.filename}" if exc.filename else ""
        log.error(_one_line(f"cannot use{where}: {exc.strerror or exc}"))
        code = 1
    except Exception as exc:  # a bug: say so in one line, the traceback only with -vv
        _traceback_with_vv(runtime)
        log.error(_one_line(f"unexpected {type(exc).__name__}: {exc} (run with -vv for details)"))
        code = 1
    sys.exit(code or 0)
