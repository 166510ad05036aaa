"""Shared fixtures: the installed commands, a private data dir, real servers on 127.0.0.1.

System tests run `jobsyncd` and `jobsyncd-server` as real processes; every process a fixture
starts is killed in its teardown, and every wait is a poll with a deadline. The helpers behind
them live in tests/support/helpers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import FaultServer  # noqa: E402
from helpers import Cli, RefServer, _bin  # noqa: E402


@pytest.fixture(scope="session")
def jobsyncd_bin() -> str:
    return _bin("jobsyncd")


@pytest.fixture(scope="session")
def server_bin() -> str:
    return _bin("jobsyncd-server")


@pytest.fixture
def cli(jobsyncd_bin: str, tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(jobsyncd_bin, tmp_path / "data", home)


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


@pytest.fixture
def ref_server(server_bin: str, tmp_path: Path) -> Iterator[RefServer]:
    workdir = tmp_path / "refserver"
    workdir.mkdir()
    srv = RefServer(server_bin, workdir).start()
    try:
        yield srv
    finally:
        srv.stop()
