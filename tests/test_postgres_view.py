"""Issue 8: the database server view of `poolwatch exporter --postgres-dsn` on real PostgreSQL."""

from __future__ import annotations

import socket
import time

import psycopg

from tests.support import planted
from tests.support.exporter import run_exporter, start_workers
from tests.support.net import wait_for
from tests.support.postgres import PASSWORD, remove, start_postgres
from tests.test_multiproc import workers_of


def test_connections_by_application_and_state_then_database_down(tmp_path):
    pg = start_postgres()  # our own server: this test stops it
    directory = str(tmp_path / "mp")
    app = exporter = None
    conns: list[psycopg.Connection] = []
    try:
        app = start_workers(
            "uvicorn",
            "tests.apps.pool_app:app",
            2,
            {"POOLWATCH_MULTIPROC_DIR": directory, "SA_URL": pg.dsn("postgresql+asyncpg")},
        )
        exporter = run_exporter(
            "--multiproc-dir", directory, env={"POOLWATCH_POSTGRES_DSN": pg.dsn()}
        )
        # 5 connections of one application: 4 idle, 1 left idle in transaction.
        for i in range(5):
            conn = psycopg.connect(pg.dsn(), application_name="billing", autocommit=i > 0)
            conn.execute("SELECT 1")  # the first one opens a transaction and leaves it open
            conns.append(conn)
        time.sleep(1.2)
        samples = exporter.scrape()
        server = {"server_address": "127.0.0.1", "server_port": str(pg.port)}
        billing = {"application_name": "billing", "db_namespace": "app", **server}
        count = "postgresql_connection_count"
        assert samples.value("postgresql_up", **server) == 1
        assert samples.value(count, state="idle", **billing) == 4
        assert samples.value(count, state="idle in transaction", **billing) == 1
        assert (
            1.0 <= samples.value("postgresql_idle_in_transaction_max_age_seconds", **billing) < 60
        )
        own = {"application_name": "poolwatch-exporter", "state": "active", "db_namespace": "app"}
        assert samples.value(count, **own) == 1  # the exporter's own query, named
        assert samples.value("postgresql_connection_max", **server) == 200
        assert conns[1].execute("SHOW max_connections").fetchone() == ("200",)
        reserved = int(conns[1].execute("SHOW superuser_reserved_connections").fetchone()[0])
        assert samples.value("postgresql_connection_reserved", **server) == reserved == 3
        assert len(workers_of(samples)) == 2  # the workers' pools, served alongside

        # Stop PostgreSQL: the exporter keeps serving the workers and reports the database down.
        pg.stop()
        started = time.monotonic()
        samples = exporter.scrape()
        assert time.monotonic() - started < 5
        assert samples.value("postgresql_up", **server) == 0
        for name in ("postgresql_connection_max", "postgresql_connection_reserved", count):
            assert not samples.find(name)
        assert len(workers_of(samples)) == 2
        assert exporter.scrape().value("postgresql_up", **server) == 0  # and keeps doing so

        # Back up: the next scrape reconnects.
        pg.start()
        wait_for(lambda: exporter.scrape().value("postgresql_up", **server) == 1, timeout=15)
        log = exporter.log()
        assert '"event": "postgres view: database down or login refused"' in log
        assert '"event": "postgres view: database reachable"' in log
        assert PASSWORD not in log
        assert PASSWORD not in exporter.scrape().text
    finally:
        for conn in conns:
            conn.close()
        if exporter is not None:
            exporter.stop()
        if app is not None:
            app.stop()
        remove(pg)


def test_refused_login_is_down_without_leaking_the_password(postgres, tmp_path):
    wrong = planted.WRONG_DB_PASSWORD
    dsn = f"postgresql://postgres:{wrong}@127.0.0.1:{postgres.port}/app"
    exporter = run_exporter("--multiproc-dir", str(tmp_path), "--postgres-dsn", dsn)
    try:
        samples = exporter.scrape()
        assert samples.value("postgresql_up") == 0
        assert samples.value("poolwatch_exporter_workers") == 0  # the rest is still served
        assert not samples.find("postgresql_connection_max")
    finally:
        exporter.stop()
    log = exporter.log()
    assert "password authentication failed" in log
    assert wrong not in log and wrong not in samples.text


def test_a_server_that_never_answers_costs_a_bounded_scrape(tmp_path):
    with socket.socket() as silent:  # accepts TCP (backlog), never speaks PostgreSQL
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        dsn = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/app"
        exporter = run_exporter(
            "--multiproc-dir", str(tmp_path), "--postgres-dsn", dsn, "--postgres-timeout", "1"
        )
        try:
            started = time.monotonic()
            samples = exporter.scrape(timeout=15)
            elapsed = time.monotonic() - started
            assert samples.value("postgresql_up") == 0
            assert elapsed < 6, elapsed  # libpq's connect timeout is at least 2 s
        finally:
            exporter.stop()
