"""Hooks on private library APIs degrade: a release that renamed or reshaped a method a probe
wraps turns that probe (or, for an optional hook, that one series) off with one counted error
and one log line; ``instrument()`` does not raise, nothing of the probe stays on the library,
and the app's pools and sessions keep working (real PostgreSQL, a real aiohttp upstream).

A rename is played in-process: the method leaves the class, where poolwatch looks for it, while
the library's own calls still find it (through a class-level ``__getattr__``), as they would
find the renamed method in such a release.
"""

from __future__ import annotations

import asyncio
import importlib

import pytest
import structlog

import poolwatch
from poolwatch._log import errors
from poolwatch._patching import TargetChanged, check_target, subclasses
from poolwatch.testing import snapshot
from tests.support.upstream import Upstream, host

# (probe, "module:Class", private method, the probe stays on without it (one series is lost))
HOOKS = [
    ("sqlalchemy", "sqlalchemy.pool:Pool", "_return_conn", False),
    ("asyncpg", "asyncpg.pool:Pool", "_acquire", False),
    ("asyncpg", "asyncpg.pool:Pool", "_get_new_connection", True),
    ("aiohttp", "aiohttp:ClientSession", "_request", False),
    ("aiohttp", "aiohttp.connector:BaseConnector", "_create_connection", False),
    ("aiohttp", "aiohttp.connector:BaseConnector", "_wait_for_available_connection", True),
]
# Also wrapped, and checked the same way, but public: SQLAlchemy's Pool.connect/recreate,
# asyncpg's Pool.release/close/terminate, the constructors, and ResponseHandler.connection_lost
# (asyncio's protocol method: a rename would break aiohttp itself).
POOL = "db_client_connection_pool_name"


def _class(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def renamed(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
    """``cls.name`` gone from the class; the library's calls on instances still reach it."""
    original = vars(cls)[name]
    monkeypatch.delattr(cls, name)

    def __getattr__(self, attr: str):
        if attr == name:
            return original.__get__(self, type(self))
        raise AttributeError(attr)

    monkeypatch.setattr(cls, "__getattr__", __getattr__, raising=False)


def hooked_classes(probe: str) -> list[type]:
    """Every class the probe places hooks on (their attributes are compared before/after)."""
    if probe == "sqlalchemy":
        from sqlalchemy.engine import Engine
        from sqlalchemy.pool import Pool

        return [*subclasses(Pool), Engine]
    if probe == "asyncpg":
        from asyncpg.pool import Pool

        return [Pool]
    from aiohttp import ClientSession
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.connector import BaseConnector

    return [ClientSession, ResponseHandler, *subclasses(BaseConnector)]


async def use_the_library(probe: str, postgres, upstream: Upstream | None):
    """What an app does with the library: a query through a pool, requests through a session.
    Returns poolwatch's series as they were while the pool or session was open."""
    if probe == "sqlalchemy":
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(postgres.dsn("postgresql+asyncpg"), pool_logging_name="sa")
        async with engine.connect() as connection:
            assert (await connection.execute(text("select 41 + 1"))).scalar() == 42
        seen = snapshot()
        await engine.dispose()
    elif probe == "asyncpg":
        import asyncpg

        pool = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=2)
        poolwatch.watch_asyncpg_pool(pool, name="pg")
        async with pool.acquire() as connection:
            assert await connection.fetchval("select 41 + 1") == 42
        seen = snapshot()
        await pool.close()
    else:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(f"{upstream.url}/slow?delay=0") as response:
                    assert (await response.json()) == {"ok": True}
            seen = snapshot()
    return seen


@pytest.fixture(scope="module")
def upstream():
    with Upstream() as up:
        yield up


@pytest.mark.parametrize(("probe", "where", "method", "optional"), HOOKS)
async def test_a_renamed_private_method_turns_its_probe_off(
    clean_agent, monkeypatch, postgres, upstream, probe, where, method, optional
):
    cls = _class(where)
    renamed(monkeypatch, cls, method)
    classes = hooked_classes(probe)
    before = [dict(vars(c)) for c in classes]
    counted = errors.counts[probe]
    with structlog.testing.capture_logs() as logs:
        poolwatch.instrument(metrics_port=0)  # does not raise
    lines = [e for e in logs if e.get("probe") == probe]
    assert len(lines) == 1, logs
    assert f"{cls.__qualname__}.{method} is missing" in lines[0]["event"]
    assert errors.counts[probe] == counted + 1
    assert clean_agent.probe("loop") is not None  # the other probes are on

    series = await use_the_library(probe, postgres, upstream)  # works as without poolwatch

    assert snapshot().value("poolwatch_agent_errors_total", probe=probe) == counted + 1
    if not optional:
        assert clean_agent.probe(probe) is None
        assert not series.find("db_client_connection_count")  # the probe's series: none
        assert not series.find("http_client_open_connections")
        assert "probe is off" in lines[0]["event"]
        # nothing of the probe is left on the library: every hooked class as it was
        assert [dict(vars(c)) for c in classes] == before
        return
    assert clean_agent.probe(probe) is not None  # one series less, the others measured
    if probe == "asyncpg":
        assert series.value("db_client_connection_wait_time_seconds_count", **{POOL: "pg"}) == 1
        assert not series.find("db_client_connection_create_time_seconds_count", **{POOL: "pg"})
    else:
        idle = {"http_connection_state": "idle", **host(upstream.port)}
        assert series.value("http_client_open_connections", **idle) == 1
        assert not series.find("aiohttp_client_connection_wait_time_seconds_count")


@pytest.mark.parametrize(
    ("shape", "defined", "problem"),
    [
        ("async (self, timeout)", "async def m(self, timeout): ...", None),
        ("async (self, timeout)", "def m(self, timeout): ...", "no longer a coroutine function"),
        ("(self, record)", "async def m(self, record): ...", "no longer a plain function"),
        ("async (self, timeout)", "async def m(self, deadline): ...", r"takes \(self, deadline\)"),
        ("async (self, timeout)", "async def m(self, timeout, strict): ...", "takes"),
        ("async (self, timeout)", "async def m(self, timeout, strict=False): ...", None),
        ("async (self, c, *, timeout)", "async def m(self, c, *, timeout=None): ...", None),
        ("async (self, c, *, timeout)", "async def m(self, c, *, limit=None): ...", "takes"),
        ("async (self, method, url, ...)", "async def m(self, method, url, data): ...", None),
        ("(self, ...)", "def m(self, *args, **kwargs): ...", None),
        ("(self, ...)", "m = staticmethod(lambda: None)", "is a staticmethod"),
    ],
)
def test_a_hook_target_is_checked_against_the_shape_its_wrapper_assumes(shape, defined, problem):
    namespace: dict = {}
    exec(f"class Library:\n    {defined}", namespace)
    if problem is None:
        check_target(namespace["Library"], "m", shape)
    else:
        with pytest.raises(TargetChanged, match=problem):
            check_target(namespace["Library"], "m", shape)


async def test_a_probe_that_raises_while_installing_is_undone(clean_agent, monkeypatch, postgres):
    """A bug of a probe (not a changed target) is counted and logged the same way, and what the
    probe placed before it failed is taken off again."""
    from asyncpg.pool import Pool

    from poolwatch.probes import asyncpg as probe

    before = dict(vars(Pool))
    real = probe.install

    def install(agent, hooks):
        real(agent, hooks)
        raise RuntimeError("a bug")

    monkeypatch.setattr(probe, "install", install)
    counted = errors.counts["asyncpg"]
    poolwatch.instrument(metrics_port=0)
    assert clean_agent.probe("asyncpg") is None
    assert dict(vars(Pool)) == before
    assert errors.counts["asyncpg"] == counted + 1
    await asyncio.wait_for(use_the_library("asyncpg", postgres, None), 30)


def test_a_probe_that_cannot_import_what_it_hooks_is_off(clean_agent, monkeypatch):
    """A release that moved a class a probe imports: that probe is off, instrument() goes on."""
    import sys

    monkeypatch.delitem(sys.modules, "poolwatch.probes.aiohttp")  # imported afresh below
    monkeypatch.setitem(sys.modules, "aiohttp.client_proto", None)  # "no such module" now
    counted = errors.counts["aiohttp"]
    with structlog.testing.capture_logs() as logs:
        poolwatch.instrument(metrics_port=0)
    assert clean_agent.probe("aiohttp") is None
    assert clean_agent.probe("sqlalchemy") is not None
    assert errors.counts["aiohttp"] == counted + 1
    (line,) = [e for e in logs if e.get("probe") == "aiohttp"]
    assert "the aiohttp probe is off" in line["event"] and "aiohttp.client_proto" in line["event"]
