"""Fixtures that run the installed `jobsyncd-server` as a real process on 127.0.0.1, on each
storage engine: every test that takes a server runs on SQLite and on PostgreSQL (pgtest.py);
`@pytest.mark.sqlite_only` keeps a test that reads the SQLite file itself to that engine.

Every process a fixture starts is killed in its teardown; every wait is a poll with a deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pgtest  # noqa: E402
import pytest
import requests
from serverproc import RunningServer, start_server  # noqa: E402

ENGINES = ["sqlite", "postgres"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: the test reads the SQLite file directly")


def _kill(running: RunningServer) -> None:
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(engine: str, request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None on SQLite (each server's own file); on PostgreSQL a fresh database for this test."""
    if engine == "sqlite":
        yield None
        return
    if request.node.get_closest_marker("sqlite_only"):
        pytest.skip("reads the SQLite file directly")
    url = pgtest.create_database()
    yield url
    pgtest.drop_database(url)


@pytest.fixture
def server_factory(tmp_path: Path, db_url: str | None) -> Iterator[Callable[..., RunningServer]]:
    """Start servers (each a real process) with extra options; all are killed at teardown.
    On PostgreSQL they share the test's database, as on SQLite they share tmp_path's file."""
    started: list[RunningServer] = []

    def factory(
        *args: str, token: str | None = None, workdir: Path | None = None, **kw: object
    ) -> RunningServer:
        kw.setdefault("db_url", db_url)  # another database: pass db_url=pgtest.create_database()
        running = start_server(
            workdir or tmp_path,
            *args,
            token=token,
            **kw,  # type: ignore[arg-type]
        )
        started.append(running)
        return running

    yield factory
    for running in started:
        _kill(running)


@pytest.fixture
def server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A fresh server without a token file (empty collection)."""
    return server_factory()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Iterator[RunningServer]:
    """One server for tests that only need their own jobs (unique local_ids)."""
    url = pgtest.create_database() if engine == "postgres" else None
    running = start_server(tmp_path_factory.mktemp("shared-server"), db_url=url)
    yield running
    _kill(running)
    if url:
        pgtest.drop_database(url)


@pytest.fixture
def client(shared_server: RunningServer) -> Iterator[requests.Session]:
    with shared_server.session() as session:
        yield session
