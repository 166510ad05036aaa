"""The reference job server of contract section 7: a WSGI application over SQLite.

`create_app()` builds it (settings from JOBSYNCD_SERVER_* or keyword arguments), so that
`gunicorn 'jobsyncd.server:create_app()'` serves it; `jobsyncd-server` (cli.py) is a small
threaded HTTP/1.1 server for it. Importable on its own: nothing here imports the agent.
"""

from __future__ import annotations

from jobsyncd.server.app import create_app

__all__ = ["create_app"]
