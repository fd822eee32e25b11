"""The pre-fork tests' app (tests/apps/workers_app.py) and what its clients and its target show
(test_prefork.py, test_prefork_edges.py)."""

from __future__ import annotations

import contextlib
import urllib.error

from tests.support.net import get

WORKERS_APP = "tests.apps.workers_app:app"
POOL_SERIES = "db_client_connection_max"


def workers_of(samples, name: str = POOL_SERIES) -> set[str]:
    """The ``worker`` labels of the series ``name`` in a scrape."""
    return {s.labels.get("worker") for s in samples.find(name)}


def try_scrape(app):
    """The app's target scraped, or None if it does not answer within 2 s."""
    with contextlib.suppress(OSError):
        return app.scrape(timeout=2)
    return None


def statuses(app, path: str = "/sa/query", n: int = 6) -> list[int]:
    """What clients of the app see: the status of ``n`` requests."""
    codes = []
    for _ in range(n):
        try:
            get(app.url + path, timeout=10)
            codes.append(200)
        except urllib.error.HTTPError as exc:
            codes.append(exc.code)
    return codes


def app_env(tmp_path, bare: bool) -> dict[str, str]:
    """The pool app on SQLite, its temporary directory (TMPDIR) under ``tmp_path``."""
    tmpdir = tmp_path / ("tmp-bare" if bare else "tmp")
    tmpdir.mkdir()
    return {
        "SA_URL": f"sqlite+aiosqlite:///{tmp_path}/app.db",
        "TMPDIR": str(tmpdir),
        "TEST_APP_BARE": "1" if bare else "0",
    }
