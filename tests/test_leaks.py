"""Issue 10: connection leak detection on real apps under uvicorn, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
from sqlalchemy import create_engine, text

from tests.support.load import burst
from tests.support.net import free_port, scrape
from tests.support.postgres import PASSWORD

APP = "tests.apps.pool_app:app"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LEAKS = "poolwatch_connection_leaks_total"


def log_lines(server) -> list[str]:
    return ANSI.sub("", server.log()).splitlines()


def field(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=('[^']*'|\S+)", line)
    assert match, f"no {name}= in {line!r}"
    return match.group(1).strip("'")


async def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize(
    ("env_key", "scheme", "route", "task_kind"),
    [
        ("SA_URL", "postgresql+asyncpg", "/sa/hold", "Task-"),
        ("ASYNCPG_DSN", "postgresql", "/apg/hold", "Task-"),
        ("SYNC_SA_URL", "postgresql+psycopg", "/sync/hold", "thread "),
    ],
)
async def test_connection_held_past_threshold_is_a_leak_until_it_comes_back(
    postgres, app_server, env_key, scheme, route, task_kind
):
    env = {env_key: postgres.dsn(scheme), "POOLWATCH_LEAK_THRESHOLD": "0.5"}
    server = app_server(APP, env)
    pool = {"db_client_connection_pool_name": f"127.0.0.1:{postgres.port}/app"}
    assert server.scrape().value(LEAKS, **pool) == 0

    # Short holds (well under the threshold; no more than the pool's max at once) are not leaks.
    assert await burst(f"{server.url}{route}?seconds=0.01", 3) == [200] * 3

    holding = asyncio.ensure_future(burst(f"{server.url}{route}?seconds=2.0", 1))
    warning = await wait_for(
        lambda: next((ln for ln in log_lines(server) if "connection leak suspected" in ln), None)
    )
    assert not holding.done()  # reported while the connection is still held
    assert server.scrape().value(LEAKS, **pool) == 1
    assert "[warning" in warning
    assert field(warning, "pool") == pool["db_client_connection_pool_name"]
    assert field(warning, "route") == route
    assert field(warning, "task").startswith(task_kind)
    assert 0.5 < float(field(warning, "held_seconds")) < 2.0
    log = ANSI.sub("", server.log())
    stack = log[log.index("Stack at checkout") :]
    assert "tests/apps/pool_app.py" in stack and "_hold" in stack  # the handler that took it
    assert "unleaked" not in log

    assert await holding == [200]
    unleaked = await wait_for(
        lambda: next((ln for ln in log_lines(server) if "connection unleaked" in ln), None)
    )
    assert "[info" in unleaked and field(unleaked, "route") == route
    assert 1.95 <= float(field(unleaked, "held_seconds")) < 4.0  # the total time held
    await asyncio.sleep(0.5)  # later scans do not report it again
    lines = log_lines(server)
    assert sum("connection leak suspected" in ln for ln in lines) == 1
    assert sum("connection unleaked" in ln for ln in lines) == 1
    assert server.scrape().value(LEAKS, **pool) == 1
    assert server.scrape().value("poolwatch_agent_errors_total", probe="leaks") == 0
    assert PASSWORD not in log


async def test_leak_detection_off_by_default_logs_nothing(postgres, app_server):
    server = app_server(APP, {"SA_URL": postgres.dsn("postgresql+asyncpg")})
    pool = {"db_client_connection_pool_name": f"127.0.0.1:{postgres.port}/app"}
    assert await burst(f"{server.url}/sa/hold?seconds=1.5", 1) == [200]
    samples = server.scrape()
    assert samples.value(LEAKS, **pool) == 0
    assert samples.value("db_client_connection_use_time_seconds_count", **pool) == 1
    log = server.log()
    assert "leak" not in log and "Stack at checkout" not in log


def count_checkout_captures(monkeypatch) -> list[int]:
    from poolwatch.probes import leaks

    calls = [0]
    original = leaks._checkout

    def counting():
        calls[0] += 1
        return original()

    monkeypatch.setattr(leaks, "_checkout", counting)
    return calls


def leak_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "poolwatch-leaks"]


def test_off_means_plain_dict_no_capture_no_thread(agent, tmp_path, monkeypatch):
    from poolwatch.probes.sqlalchemy import watch

    calls = count_checkout_captures(monkeypatch)
    engine = create_engine(f"sqlite:///{tmp_path}/off.db", pool_logging_name="off")
    stats = watch(agent, engine)
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert type(stats.held) is dict  # the probes' hot path is the leak-free code path
    assert calls == [0]
    assert leak_threads() == []
    engine.dispose()


def test_on_captures_each_checkout_and_checker_stops(clean_agent, tmp_path, monkeypatch):
    import poolwatch
    from poolwatch.agent import agent
    from poolwatch.probes.leaks import HeldConnections
    from poolwatch.probes.sqlalchemy import watch

    calls = count_checkout_captures(monkeypatch)
    poolwatch.instrument(metrics_port=free_port(), leak_threshold=0.2)
    agent.start()
    assert leak_threads() == ["poolwatch-leaks"]
    engine = create_engine(f"sqlite:///{tmp_path}/on.db", pool_logging_name="on")
    stats = watch(agent, engine)
    assert isinstance(stats.held, HeldConnections)
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert calls == [20]
    assert stats.held == {} and stats.held.takers == {}  # nothing kept after returns
    with engine.connect():
        time.sleep(0.5)
    samples = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    assert samples.value(LEAKS, db_client_connection_pool_name="on") == 1
    assert stats.held.reported == {}
    engine.dispose()
    poolwatch.uninstrument()  # stops the checker
    assert leak_threads() == []
