"""PostgreSQL for the server tests: a fresh database per test on the cluster named by
JOBSYNCD_TEST_PG_URL (tests/pg_cluster.sh starts one; .ci/run does it in CI).

Without that variable the PostgreSQL variants skip with the reason, except in CI (CI=true), where
they fail: a CI run must not pass by skipping them.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV_URL = "JOBSYNCD_TEST_PG_URL"
SKIP_REASON = (
    f"{ENV_URL} is not set: start a throw-away cluster with "
    "`tests/pg_cluster.sh start /tmp/jobsyncd-pg` and export the URL it prints"
)


def admin_url() -> str:
    url = os.environ.get(ENV_URL)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{ENV_URL} is unset in CI: .ci/run should have started PostgreSQL")
        pytest.skip(SKIP_REASON)
    return url


def create_database() -> str:
    """A new empty database on the test cluster; its URL."""
    import psycopg

    admin = admin_url()
    name = f"jtest_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(admin)
    return urlunsplit(parts._replace(path=f"/{name}"))


def drop_database(url: str) -> None:
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    try:
        with psycopg.connect(admin_url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except psycopg.Error:
        pass  # a throw-away cluster: what is left goes with it


def copy_database(source: str, target: str) -> None:
    """`target` becomes a copy of `source` (a backup, or its restore); nobody may be connected."""
    import psycopg

    names = [urlsplit(url).path.lstrip("/") for url in (source, target)]
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {names[1]} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {names[1]} TEMPLATE {names[0]}")


def sibling(url: str) -> str:
    """The URL of another (new) database name on the same cluster."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/jtest_{uuid.uuid4().hex[:16]}"))
