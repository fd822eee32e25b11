"""The database server's view for ``poolwatch exporter --postgres-dsn``: connection limits and who
holds the connections, read from PostgreSQL at scrape time.

One connection (``application_name=poolwatch-exporter``), kept open between scrapes and
reopened after a failure, with connect and statement timeouts. When the server is down or
refuses the login, only ``postgresql_up`` 0 is exported and the exporter serves the rest. The
password is never logged or exported (the labels are the host and port only).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from .._log import logger
from ..metrics import (
    PG_CONNECTION_COUNT,
    PG_CONNECTION_MAX,
    PG_CONNECTION_RESERVED,
    PG_IDLE_IN_TRANSACTION,
    PG_UP,
    Point,
)

MAX_APPLICATIONS = 50  # distinct application_name labels; the rest count under "other"
IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")

SETTINGS_QUERY = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true)::int, 0)
"""
# Client backends only: background workers do not take max_connections slots. A role without
# pg_monitor/pg_read_all_stats sees other roles' sessions with a NULL state ("unknown").
ACTIVITY_QUERY = """
SELECT coalesce(datname, ''), coalesce(state, 'unknown'), coalesce(application_name, ''),
       count(*),
       max(extract(epoch FROM clock_timestamp() - state_change))
           FILTER (WHERE state LIKE 'idle in transaction%')
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY 1, 2, 3
"""


class InvalidDsn(ValueError):
    pass


class PostgresView:
    """prometheus_client-style source: ``points()`` queries the server (call from any thread)."""

    def __init__(self, dsn: str, timeout: float = 2.0) -> None:
        from psycopg.conninfo import conninfo_to_dict

        try:
            params: dict[str, Any] = conninfo_to_dict(dsn)
        except Exception:  # its message may quote the DSN, password included: do not show it
            raise InvalidDsn from None
        params.setdefault("application_name", "poolwatch-exporter")
        # libpq waits at least 2 s to connect; tcp_user_timeout bounds a silent network.
        params["connect_timeout"] = str(max(2, math.ceil(timeout)))
        params["tcp_user_timeout"] = str(int(timeout * 1000))
        params["options"] = (
            f"{params.get('options', '')} -c statement_timeout={int(timeout * 1000)}"
        )
        self._params = params
        self._password: str | None = params.get("password") or os.environ.get("PGPASSWORD")
        self._timeout = timeout
        self.server: dict[str, str] = {
            "server.address": str(params.get("host") or os.environ.get("PGHOST") or "localhost"),
            "server.port": str(params.get("port") or os.environ.get("PGPORT") or "5432"),
        }
        self.database = str(params.get("dbname") or os.environ.get("PGDATABASE") or "")
        self._conn: Any = None
        self._lock = threading.Lock()  # one query at a time on the one connection
        self._up: bool | None = None

    def points(self) -> Iterator[Point]:
        if not self._lock.acquire(timeout=self._timeout * 2):
            yield Point(PG_UP, self.server, 0)  # a query is stuck: the scrape must not be
            return
        try:
            settings, activity = self._query()
        except Exception as exc:
            self._close()
            self._report(False, exc)
            yield Point(PG_UP, self.server, 0)
            return
        finally:
            self._lock.release()
        self._report(True)
        yield Point(PG_UP, self.server, 1)
        max_connections, superuser_reserved, reserved = settings
        yield Point(PG_CONNECTION_MAX, self.server, max_connections)
        yield Point(PG_CONNECTION_RESERVED, self.server, superuser_reserved + reserved)
        yield from self._activity_points(activity)

    def _query(self) -> tuple[tuple[int, int, int], list[tuple[Any, ...]]]:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(**self._params, autocommit=True)
        with self._conn.cursor() as cur:
            cur.execute(SETTINGS_QUERY)
            settings = cur.fetchone()
            cur.execute(ACTIVITY_QUERY)
            return settings, cur.fetchall()

    def _activity_points(self, rows: list[tuple[Any, ...]]) -> Iterator[Point]:
        per_app: Counter[str] = Counter()
        for _, _, app, count, _ in rows:
            per_app[app] += count
        kept = {app for app, _ in per_app.most_common(MAX_APPLICATIONS)}
        counts: Counter[tuple[str, str, str]] = Counter()
        idle_age: dict[tuple[str, str], float] = {}
        for database, state, app, count, age in rows:
            app = app if app in kept else "other"
            counts[(database, state, app)] += count
            if state in IDLE_IN_TRANSACTION and age is not None:
                key = (database, app)
                idle_age[key] = max(idle_age.get(key, 0.0), float(age))
        for (database, state, app), count in sorted(counts.items()):
            labels = {"db.namespace": database, "state": state, "application_name": app}
            yield Point(PG_CONNECTION_COUNT, self.server | labels, count)
        for (database, app), age in sorted(idle_age.items()):
            labels = {"db.namespace": database, "application_name": app}
            yield Point(PG_IDLE_IN_TRANSACTION, self.server | labels, age)

    def _report(self, up: bool, exc: BaseException | None = None) -> None:
        """Log changes of state only (not every scrape), never the password."""
        if up == self._up:
            return
        self._up = up
        where = {
            "server": f"{self.server['server.address']}:{self.server['server.port']}",
            "database": self.database,
        }
        if up:
            logger.info("postgres view: database reachable", **where)
        else:
            logger.warning(
                "postgres view: database down or login refused", error=self._redact(exc), **where
            )

    def _redact(self, exc: BaseException | None) -> str:
        text = f"{type(exc).__name__}: {exc}".strip()
        if self._password:
            text = text.replace(self._password, "***")
        return " ".join(text.split())  # one line

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._close()
