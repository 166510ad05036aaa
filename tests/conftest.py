"""Shared fixtures: the installed commands, a private data dir, real servers on 127.0.0.1.

System tests run `jobsyncd` and `jobsyncd-server` as real processes; every process a fixture
starts is killed in its teardown, and every wait is a poll with a deadline. The helpers behind
them live in tests/support/helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import FaultServer  # noqa: E402
from helpers import Cli, RefServer, _bin  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_umask() -> Iterator[None]:
    """prepare_data_dir sets the process umask to 077 (as the CLI wants), and in-process tests
    call it: every test starts and ends with the umask it found."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


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
