"""Shared fixtures: a real PostgreSQL, real uvicorn apps, an in-process agent."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.support.apps import AppServer, start_app
from tests.support.net import free_port
from tests.support.postgres import Postgres, remove, start_postgres
from tests.support.redis import Redis, start_redis

# every test is scanned for the planted secrets leaking into its outputs (issue 11)
pytest_plugins = ["tests.support.secret_scan"]

# the shop app's own suite is a separate project (its own pytest.ini): test_app_suite runs it
collect_ignore = ["apps/shop"]


def pytest_configure(config: pytest.Config) -> None:
    """Every temporary file of the run (app and exporter logs, databases, Prometheus data, the
    subprocesses' own) goes under one directory, removed at the end unless a test failed."""
    config.poolwatch_tmp = tempfile.mkdtemp(prefix="poolwatch-tests-")
    os.chmod(config.poolwatch_tmp, 0o755)  # PostgreSQL runs as its own user: it must get in
    os.environ["TMPDIR"] = tempfile.tempdir = config.poolwatch_tmp


@pytest.hookimpl(trylast=True)  # after the secret scan has read the logs
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = getattr(session.config, "poolwatch_tmp", None)
    if path is None or not os.path.isdir(path):
        return
    if exitstatus == session.exitstatus == pytest.ExitCode.OK:  # the scan may fail it late
        shutil.rmtree(path, ignore_errors=True)
    else:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"logs and data of this run kept in {path}")


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    pg = start_postgres()
    yield pg
    remove(pg)


@pytest.fixture(scope="session")
def redis_server() -> Redis:
    """Debian's redis-server with a password, on a free port, for the whole session."""
    from tests.support import redis

    server = start_redis()
    yield server
    redis.remove(server)


@pytest.fixture
def app_server():
    """``app_server("tests.apps.pool_app:app", env={...})``: a running AppServer, stopped after."""
    started: list[AppServer] = []

    def start(target: str, env: dict[str, str] | None = None, **kwargs) -> AppServer:
        server = start_app(target, env, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def clean_agent():
    """The process-wide agent, uninstrumented before and after the test, which instruments it
    as it needs (``poolwatch.instrument(...)``). The error counts (process-wide; tests assert
    them) are put back as they were."""
    import poolwatch
    from poolwatch._log import errors
    from poolwatch.agent import agent as the_agent

    counts, logged = errors.counts.copy(), set(errors._logged)
    poolwatch.uninstrument()
    yield the_agent
    poolwatch.uninstrument()
    errors.counts, errors._logged = counts, logged


@pytest.fixture
def agent(clean_agent):
    """The process-wide agent, instrumented in this process with its listener on a free port."""
    import poolwatch

    poolwatch.instrument(metrics_port=free_port())
    clean_agent.start()
    return clean_agent


@pytest.fixture(autouse=True)
def _structlog_as_an_app_left_it():
    """``structlog.testing.capture_logs()`` leaves structlog marked as configured, which would
    send poolwatch's lines of every later test through structlog's defaults (stdout) instead of
    its own whole-line stderr writer: put it back after each test."""
    import structlog

    configured = structlog.is_configured()
    yield
    if structlog.is_configured() and not configured:
        structlog.reset_defaults()
