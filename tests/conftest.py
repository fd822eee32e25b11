"""Shared fixtures: a real PostgreSQL, real uvicorn apps, an in-process agent."""

from __future__ import annotations

import pytest

from tests.support.apps import AppServer, start_app
from tests.support.net import free_port
from tests.support.postgres import Postgres, remove, start_postgres

# every test is scanned for the planted secrets leaking into its outputs (issue 11)
pytest_plugins = ["tests.support.secret_scan"]


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    pg = start_postgres()
    yield pg
    remove(pg)


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
def agent():
    """The process-wide agent, instrumented in this process with its listener on a free port."""
    import poolwatch
    from poolwatch.agent import agent as the_agent

    poolwatch.instrument(metrics_port=free_port())
    the_agent.start()
    yield the_agent
    poolwatch.uninstrument()
