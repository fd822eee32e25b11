"""Issue 11: the app never pays for its observer — faults, bad input, access control."""

from __future__ import annotations

import asyncio
import string
import urllib.error

import pytest
import structlog
from hypothesis import example, given, settings
from hypothesis import strategies as st

from poolwatch.config import SPECS, ConfigError, load_settings
from tests.support import planted
from tests.support.net import get, scrape
from tests.support.postgres import remove, start_postgres

APP = "tests.apps.pool_app:app"
ALLOWED_ERROR_MODULES = ("sqlalchemy.", "asyncpg.", "builtins.", "asyncio.", "socket.")


@pytest.fixture
def own_postgres():
    """A PostgreSQL of this test's own: it gets restarted."""
    pg = start_postgres()
    yield pg
    remove(pg)


async def _load_through_restart(server, pg) -> list[str]:
    """4 clients query through both pools for ~4 s; PostgreSQL restarts at 1 s."""
    import aiohttp

    errors: list[str] = []
    deadline = asyncio.get_running_loop().time() + 4

    async def client(session, route):
        while asyncio.get_running_loop().time() < deadline:
            async with session.get(server.url + route) as response:
                body = await response.json()
                if response.status != 200:
                    errors.append(body["error"])
            await asyncio.sleep(0.01)

    async def restart():
        await asyncio.sleep(1)
        await asyncio.to_thread(pg.restart)

    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(
            restart(), *(client(session, r) for r in ("/sa/query", "/apg/query") * 2)
        )
    return errors


async def test_postgres_restart_under_load_app_errors_unchanged(own_postgres, app_server):
    env = {"SA_URL": own_postgres.dsn("postgresql+asyncpg"), "ASYNCPG_DSN": own_postgres.dsn()}
    bare = app_server(APP, {**env, "TEST_APP_BARE": "1"}, metrics=False)
    bare_errors = await _load_through_restart(bare, own_postgres)
    bare.stop()
    server = app_server(APP, env)
    errors = await _load_through_restart(server, own_postgres)

    # the restart hurts both runs alike: only the database libraries' own errors, none of ours
    assert bare_errors and errors
    assert all(e.startswith(ALLOWED_ERROR_MODULES) for e in bare_errors + errors), set(errors)
    assert {e.split(".")[0] for e in errors} <= {e.split(".")[0] for e in bare_errors} | {
        "builtins"
    }
    for route in ("/sa/query", "/apg/query"):  # the app recovers
        assert '"value":1' in get(server.url + route)
    await asyncio.sleep(0.2)
    samples = server.scrape()
    pool = {"db_client_connection_pool_name": f"127.0.0.1:{own_postgres.port}/app"}
    assert samples.value("sqlalchemy_pool_invalidations_total", soft="false", **pool) >= 1
    for name in (
        pool["db_client_connection_pool_name"],
        f"{pool['db_client_connection_pool_name']}#2",
    ):
        used = {"db_client_connection_pool_name": name, "db_client_connection_state": "used"}
        assert samples.value("db_client_connection_count", **used) == 0
    assert all(s.value == 0 for s in samples.find("poolwatch_agent_errors_total"))
    assert "poolwatch hook failed" not in server.log()


class _Broken(dict):
    def __setitem__(self, key, value):
        raise RuntimeError("injected fault")

    def pop(self, *args):
        raise RuntimeError("injected fault")


def _errors(agent, probe: str) -> float:
    return scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics").value(
        "poolwatch_agent_errors_total", probe=probe
    )


def test_sqlalchemy_hook_fault_is_counted_logged_once_and_the_app_goes_on(agent, tmp_path):
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{tmp_path}/f.db", pool_logging_name="faulty")
    engine.pool._poolwatch_stats.held = _Broken()
    with structlog.testing.capture_logs() as logs:
        for _ in range(50):
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
    assert _errors(agent, "sqlalchemy") >= 50  # every failed hook counted
    failures = [entry for entry in logs if entry.get("probe") == "sqlalchemy"]
    assert len(failures) == 1 and failures[0]["log_level"] == "error"


async def test_asyncpg_hook_fault_is_counted_logged_once_and_the_app_goes_on(agent, postgres):
    import asyncpg

    from poolwatch.probes.asyncpg import _stats

    pool = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=2)
    _stats[id(pool)].held = _Broken()
    with structlog.testing.capture_logs() as logs:
        for _ in range(50):
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT 1") == 1
    await pool.close()
    assert _errors(agent, "asyncpg") >= 50
    assert len([e for e in logs if e.get("probe") == "asyncpg"]) == 1


def test_a_failing_source_does_not_break_the_scrape(agent):
    class Failing:
        probe = "aiohttp"

        def alive(self):
            return True

        def points(self):
            raise RuntimeError("injected fault")

    agent.registry.add(Failing())
    samples = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    assert samples.value("poolwatch_build_info", version=__import__("poolwatch").__version__) == 1
    assert samples.value("poolwatch_agent_errors_total", probe="aiohttp") >= 1


def _valid_alone(spec, value: str) -> bool:
    try:
        spec.parse(value)
    except (ValueError, TypeError):
        return False
    return True


@settings(max_examples=300, deadline=None)
@example(name="loop_interval", value="1")  # valid alone, not with the default block threshold
@example(name="block_threshold", value="0.001")
@example(name="n_plus_one", value="1")  # an integer, below its own floor
@given(
    name=st.sampled_from(sorted(SPECS)),
    value=st.text(alphabet=string.printable + "é€\x00", max_size=12),
)
def test_any_setting_value_parses_or_fails_with_one_clear_line(name, value):
    spec = SPECS[name]
    try:
        load_settings(environ={spec.env: value})
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        if name in ("loop_interval", "block_threshold") and _valid_alone(spec, value):
            # a value valid alone, against the other one's default: the rule joining the two
            assert message.startswith("POOLWATCH_LOOP_INTERVAL="), message
            assert "must be smaller than POOLWATCH_BLOCK_THRESHOLD=" in message
            return
        assert message.startswith(f"{spec.env}={value!r} is invalid: expected {spec.allowed}")


def test_metrics_token_is_required_when_set(clean_agent, tmp_path):
    import poolwatch
    from poolwatch.agent import agent
    from tests.support.net import free_port

    poolwatch.instrument(metrics_port=free_port(), metrics_token=planted.METRICS_TOKEN)
    agent.start()
    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": planted.METRICS_TOKEN},
    ):
        with pytest.raises(urllib.error.HTTPError) as denied:
            get(url, headers=headers)
        assert denied.value.code == 401
        assert b"poolwatch" not in denied.value.read()
    ok = scrape(url, headers={"Authorization": f"Bearer {planted.METRICS_TOKEN}"})
    assert ok.find("poolwatch_build_info")
    assert planted.METRICS_TOKEN not in repr(agent.settings)


def test_listener_binds_loopback_by_default():
    assert load_settings(environ={}).metrics_addr == "127.0.0.1"
