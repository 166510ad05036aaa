"""What one run of jobsyncd works with: the settings, the store, the verbosity, a reload.

The CLI builds one `Runtime` from the global options and hands it to each command; the daemon
takes it over (its reload reads the same config file with the same overrides). Everything is
resolved lazily, so a config error surfaces only in a command that needs the settings. Imports
nothing of the CLI (no Click) and nothing costly at module level.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import log

if TYPE_CHECKING:  # for the annotations only: importing them costs start-up time
    from .config import Settings
    from .store import Store


class Runtime:
    """The global options' decisions (config file, data dir, server, -v/-q) and what follows
    from them, each made once: the settings, the store of the data dir."""

    def __init__(
        self,
        config_file: str | None = None,
        data_dir: str | None = None,
        server: str | None = None,
        verbose: int = 0,
        quiet: bool = False,
    ) -> None:
        self.config_file = config_file
        self.overrides: dict[str, str | None] = {"data_dir": data_dir, "server_url": server}
        self.verbose = verbose
        self.quiet = quiet
        self._settings: Settings | None = None
        self._store: Store | None = None

    def set_verbosity(self, verbose: int, quiet: bool) -> None:
        self.verbose, self.quiet = verbose, quiet
        log.configure(verbose=verbose, quiet=quiet)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from .config import load_settings

            self._settings = load_settings(self.config_file, self.overrides)
            for message in self._settings.warnings:
                log.warning(message)
        return self._settings

    def reload(self) -> Settings:
        """The settings read afresh (the daemon's SIGHUP); raises JobsyncdError for a bad file.
        The settings in use are not replaced: the caller decides whether to take the new ones."""
        from .config import load_settings

        return load_settings(self.config_file, self.overrides)

    @property
    def store(self) -> Store:
        if self._store is None:
            from .fsutil import prepare_data_dir
            from .store import Store

            prepare_data_dir(self.settings.data_dir)
            self._store = Store(self.settings.data_dir, warn=log.warning)
        return self._store

    def wake_daemon(self) -> None:
        # Only when a daemon's socket is there: importing socket costs start-up time.
        if os.path.exists(os.path.join(self.settings.data_dir, "daemon.sock")):
            from .wakeup import request_sync

            request_sync(self.settings.data_dir)
