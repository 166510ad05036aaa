"""`jobsyncd config show|check|init`: what jobsyncd uses, whether it works, a file to start from.

Everything here comes from the declarations in `jobsyncd.config.SCHEMA`.
"""

from __future__ import annotations

import os
from typing import Any

import click

from ..cli import global_options, late_option, pass_runtime, print_json
from ..errors import ConfigError, JobsyncdError
from ..runtime import Runtime


@click.group()
def config() -> None:
    """Show, check or write the configuration.

    \b
    Example:
      jobsyncd config init --server https://jobs.example.org && jobsyncd config check
    """


def effective(runtime: Runtime) -> tuple[dict[str, Any], str | None]:
    """`config show --json`'s object, and the token's problem (if it cannot be read)."""
    from ..config import SCHEMA, read_token, token_source

    settings = runtime.settings
    out: dict[str, Any] = {}
    for key in SCHEMA:
        source, origin = settings.sources.get(key.name, ("default", None))
        out[key.name] = {"value": getattr(settings, key.name), "source": source, "origin": origin}
    source, origin = token_source(settings)
    problem = None
    try:
        token, _ = read_token(settings)
    except ConfigError as exc:
        token, problem = None, str(exc)
    out["token"] = {"value": "set" if token else "unset", "source": source, "origin": origin}
    return out, problem


@config.command("show")
@global_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object: value, source, origin.")
@pass_runtime
def show(runtime: Runtime, as_json: bool) -> None:
    """The settings in effect, each with where it came from (flag, env, file or default).

    The token is shown only as set or unset, and from where.

    \b
    Example:
      jobsyncd config show --json | jq .server_url
    """
    values, problem = effective(runtime)
    if as_json:
        print_json(values)
    else:
        width = max(len(k) for k in values) + 2
        for key, item in values.items():
            value = item["value"]
            shown = (
                "-" if value is None else str(value).lower() if isinstance(value, bool) else value
            )
            where = (
                item["source"] if item["origin"] is None else f"{item['source']} {item['origin']}"
            )
            click.echo(f"{key:{width}}{shown!s:40} ({where})")
        path = runtime.settings.config_path
        click.echo(f"{'config file':{width}}{path or 'none read'}")
    if problem:
        raise ConfigError(problem)


@config.command("check")
@global_options
@pass_runtime
def check(runtime: Runtime) -> None:
    """Validate the configuration, then ask the server once with the token.

    At most two authenticated GETs: the change feed, else the job listing. Exits 0 when the
    server answers, else 78 (configuration), 75 (try later), 77 (credentials) or 1, with the
    reason and what to do next.

    \b
    Example:
      jobsyncd --server https://jobs.example.org config check
    """
    from ..runner import check_connection

    click.echo(check_connection(runtime.settings))


@config.command("init")
@global_options
@click.option(
    "--server",
    metavar="URL",
    expose_value=False,
    callback=late_option,
    help="Write server_url = URL in the file (uncommented).",
)
@pass_runtime
def init(runtime: Runtime) -> None:
    """Write a commented configuration file with every key (never overwriting one).

    The file goes to the default path, or the one --config / JOBSYNCD_CONFIG names; it is
    made 0600 and the directories it creates 0700.

    \b
    Example:
      jobsyncd config init --server https://jobs.example.org
    """
    from ..config import Settings, check_server_url, config_template, default_config_path

    path = runtime.config_file or os.environ.get("JOBSYNCD_CONFIG") or default_config_path()
    path = os.path.abspath(os.path.expanduser(path))
    server = runtime.overrides.get("server_url")
    if server:
        check_server_url(Settings(server_url=server, data_dir="/"))
    _make_private_dirs(os.path.dirname(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise JobsyncdError(
            f"{path} already exists; not overwriting it (edit it, or move it away first)"
        ) from None
    except OSError as exc:
        raise JobsyncdError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(config_template(server))
    os.chmod(path, 0o600)
    click.echo(path)


def _make_private_dirs(folder: str) -> None:
    """Create the missing directories of `folder`, each 0700 (existing ones are left alone)."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for each in reversed(missing):
        try:
            os.mkdir(each, 0o700)
            os.chmod(each, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise JobsyncdError(f"cannot create {each}: {exc.strerror}") from None


COMMANDS = {"config": config}
