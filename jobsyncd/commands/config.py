"""`jobsyncd config show|check|init`."""

from __future__ import annotations

import click


@click.group()
def config() -> None:
    """Show, check or write the configuration."""


COMMANDS = {"config": config}
