"""Fixtures that run the installed `jobsyncd-server` as a real process on 127.0.0.1.

Every process a fixture starts is killed in its teardown; every wait is a poll with a deadline.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))

from serverproc import RunningServer, start_server  # noqa: E402


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start servers (each a real process) with extra options; all are killed at teardown."""
    started: list[RunningServer] = []

    def factory(
        *args: str, token: str | None = None, workdir: Path | None = None, **kw: object
    ) -> RunningServer:
        running = start_server(workdir or tmp_path, *args, token=token, **kw)  # type: ignore[arg-type]
        started.append(running)
        return running

    yield factory
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest.fixture
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A fresh server without a token file (empty collection)."""
    return server_factory()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for tests that only need their own jobs (unique local_ids)."""
    running = start_server(tmp_path_factory.mktemp("shared-server"))
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


@pytest.fixture
def client(shared_server: RunningServer) -> Iterator[requests.Session]:
    with shared_server.session() as session:
        yield session
