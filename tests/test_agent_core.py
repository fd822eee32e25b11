"""Issue 2: lifecycle of hooks (dispose, pool kinds, undo, idempotence) and configuration."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool, QueuePool, SingletonThreadPool, StaticPool

from poolwatch.config import ConfigError, load_settings
from tests.support.net import scrape


def metrics(agent):
    return scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")


def used(samples, name: str) -> float:
    return samples.value(
        "db_client_connection_count",
        db_client_connection_pool_name=name,
        db_client_connection_state="used",
    )


def test_engines_created_before_instrument_are_found(clean_agent, tmp_path):
    import poolwatch
    from poolwatch.testing import snapshot

    engine = create_engine(f"sqlite:///{tmp_path}/early.db", poolclass=QueuePool)
    poolwatch.instrument(metrics_port=0)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    names = snapshot().label_values("db_client_connection_max", "db_client_connection_pool_name")
    assert "early.db" in names


def test_dispose_and_recreate_keep_being_measured(agent, tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path}/a.db", poolclass=QueuePool, pool_size=3)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    engine.dispose()  # a new pool replaces the old one
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        assert used(metrics(agent), "a.db") == 1
    samples = metrics(agent)
    assert used(samples, "a.db") == 0
    assert (
        samples.value(
            "db_client_connection_wait_time_seconds_count", db_client_connection_pool_name="a.db"
        )
        == 2
    )
    assert (
        samples.value(
            "db_client_connection_use_time_seconds_count", db_client_connection_pool_name="a.db"
        )
        == 2
    )


@pytest.mark.parametrize("poolclass", [NullPool, StaticPool, SingletonThreadPool])
def test_other_pool_kinds_work_and_count_used(agent, tmp_path, poolclass):
    name = f"kinds-{poolclass.__name__}"
    engine = create_engine(
        f"sqlite:///{tmp_path}/k.db", poolclass=poolclass, pool_logging_name=name
    )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 41 + 1")).scalar() == 42
        assert used(metrics(agent), name) == 1
    samples = metrics(agent)
    assert used(samples, name) == 0
    assert not samples.find("db_client_connection_max", db_client_connection_pool_name=name)
    assert samples.value("poolwatch_agent_errors_total", probe="sqlalchemy") == 0
    engine.dispose()


def test_invalidations_are_counted(agent, tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path}/i.db", pool_logging_name="inv")
    with engine.connect() as conn:
        conn.invalidate()
    with engine.connect() as conn:
        conn.connection.invalidate(soft=True)
    samples = metrics(agent)
    pool = {"db_client_connection_pool_name": "inv"}
    assert samples.value("sqlalchemy_pool_invalidations_total", soft="false", **pool) == 1
    assert samples.value("sqlalchemy_pool_invalidations_total", soft="true", **pool) == 1
    assert used(samples, "inv") == 0


def test_explicit_name_and_collected_engine_disappears(agent, tmp_path):
    import gc

    import poolwatch

    engine = poolwatch.watch_engine(create_engine(f"sqlite:///{tmp_path}/n.db"), name="orders")
    with engine.connect():
        pass
    assert metrics(agent).find(
        "db_client_connection_count", db_client_connection_pool_name="orders"
    )
    del engine
    gc.collect()
    assert not metrics(agent).find(
        "db_client_connection_count", db_client_connection_pool_name="orders"
    )


def test_uninstrument_restores_every_hook_and_instrument_is_idempotent(clean_agent):
    import asyncpg.pool
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    import poolwatch

    originals = {
        (cls, name): vars(cls).get(name)
        for cls in (
            Pool,
            QueuePool,
            SingletonThreadPool,
            StaticPool,
            NullPool,
            Engine,
            asyncpg.pool.Pool,
        )
        for name in ("connect", "recreate", "__init__", "_acquire", "release", "close", "terminate")
    }
    poolwatch.instrument(metrics_port=0)
    first = Pool.connect
    poolwatch.instrument(metrics_port=0)
    assert Pool.connect is first  # idempotent: not wrapped twice
    poolwatch.uninstrument()
    for (cls, name), original in originals.items():
        assert vars(cls).get(name) is original, f"{cls.__name__}.{name} not restored"
    assert not hasattr(Pool, "_poolwatch_stats")


def test_plain_asgi_app_is_wrapped_and_starlette_instrumented_in_place(clean_agent):
    from fastapi import FastAPI

    import poolwatch
    from poolwatch.asgi import PoolwatchMiddleware

    async def bare(scope, receive, send):
        pass

    wrapped = poolwatch.instrument(bare, metrics_port=0)
    assert isinstance(wrapped, PoolwatchMiddleware) and wrapped.app is bare
    app = FastAPI()
    assert poolwatch.instrument(app) is app
    poolwatch.instrument(app)
    assert sum(m.cls is PoolwatchMiddleware for m in app.user_middleware) == 1


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("POOLWATCH_METRICS_PORT", "nine", "an integer 0-65535"),
        ("POOLWATCH_METRICS_ADDR", "not-an-ip", "an IP address"),
        ("POOLWATCH_LOOP_INTERVAL", "-1", "seconds > 0"),
        ("POOLWATCH_HTTP_CLIENT_MAX_HOSTS", "0", "an integer >= 1"),
    ],
)
def test_bad_settings_name_the_variable_and_the_fix(variable, value, expected):
    with pytest.raises(ConfigError) as error:
        load_settings(environ={variable: value})
    assert str(error.value).startswith(f"{variable}={value!r} is invalid: expected {expected}")
    assert "\n" not in str(error.value)


def test_unknown_option_is_rejected():
    with pytest.raises(ConfigError, match="unknown option"):
        load_settings({"metrics_prot": 1})


def test_options_override_environment():
    settings = load_settings({"metrics_port": 0}, environ={"POOLWATCH_METRICS_PORT": "1234"})
    assert settings.metrics_port == 0
    assert load_settings(environ={"POOLWATCH_METRICS_PORT": "1234"}).metrics_port == 1234


def _wsgi_app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]


class _FlaskLike:
    def __call__(self, environ, start_response):
        return _wsgi_app(environ, start_response)


@pytest.mark.parametrize(
    ("app", "says"),
    [
        ("hello", "got str 'hello'"),
        (42, "got int 42"),
        (_wsgi_app, "like a WSGI application"),
        (_FlaskLike(), "like a WSGI application"),
        (pytest.importorskip("fastapi").FastAPI, "pass an instance, e.g. instrument(FastAPI())"),
    ],
)
def test_instrument_refuses_what_is_no_asgi_app_in_one_line(app, says):
    import poolwatch

    with pytest.raises(TypeError) as error:
        poolwatch.instrument(app)
    message = str(error.value)
    assert "instrument() needs an ASGI application" in message and says in message
    assert "\n" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__ is False


def test_bad_setting_value_raises_one_line_without_a_chain(monkeypatch):
    import sys

    import poolwatch

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # instrument() sets its own

    monkeypatch.setenv("POOLWATCH_METRICS_PORT", "abc")
    with pytest.raises(ConfigError) as error:
        poolwatch.instrument(_asgi_app)
    assert str(error.value).startswith("POOLWATCH_METRICS_PORT='abc' is invalid")
    assert error.value.__cause__ is None and error.value.__suppress_context__
    # only the frame of the public call: no poolwatch internals in the traceback
    assert error.traceback[-1].name == "instrument"


def test_bad_setting_under_uvicorn_is_one_line_on_stderr():
    """What a user sees: the server's import traceback is not printed, only poolwatch's line."""
    import subprocess
    import sys

    from tests.support.apps import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLWATCH_")}
    env["POOLWATCH_METRICS_PORT"] = "abc"
    cmd = [sys.executable, "-m", "uvicorn", "tests.apps.starlette_app:app", "--port", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "poolwatch: POOLWATCH_METRICS_PORT='abc' is invalid: expected an integer 0-65535 "
        "(0 turns the listener off). Fix or unset POOLWATCH_METRICS_PORT."
    ]


async def _asgi_app(scope, receive, send):
    pass


def test_registry_option_adds_poolwatch_series_to_the_apps_registry(clean_agent, monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest

    import poolwatch
    from poolwatch.agent import agent

    monkeypatch.delenv("POOLWATCH_METRICS_PORT", raising=False)
    registry = CollectorRegistry()
    poolwatch.instrument(_asgi_app, registry=registry)
    poolwatch.instrument(_asgi_app, registry=registry)  # again: registered once
    agent.start()
    assert agent.metrics_port is None  # the app's /metrics serves them: no second listener
    text = generate_latest(registry).decode()
    assert 'poolwatch_build_info{version="' in text
    assert text.count("# TYPE poolwatch_build_info gauge") == 1
    poolwatch.uninstrument()  # takes poolwatch's collector out of the app's registry
    assert "poolwatch_build_info" not in generate_latest(registry).decode()


LATE_IMPORT = """
import sys
from starlette.applications import Starlette
import poolwatch
from poolwatch.testing import snapshot

def pools():
    return snapshot().label_values("db_client_connection_count", "db_client_connection_pool_name")

app = poolwatch.instrument(Starlette(), metrics_port=0)
print("imported:", sorted(m for m in ("sqlalchemy", "aiohttp") if m in sys.modules))
from sqlalchemy import create_engine, text  # the app imports SQLAlchemy after instrument()
engine = create_engine(f"sqlite:///{sys.argv[1]}/late.db")
with engine.connect() as connection:
    connection.execute(text("select 1"))
print("measured:", sorted(pools()), snapshot().value("db_client_connection_use_time_seconds_count"))
poolwatch.uninstrument()
print("finder left:", any("AfterImport" in type(f).__name__ for f in sys.meta_path))
poolwatch.instrument(Starlette(), metrics_port=0)
poolwatch.uninstrument()  # aiohttp imported after this: nothing of poolwatch runs
import aiohttp
print("hooked after uninstrument:", "poolwatch" in aiohttp.ClientSession._request.__module__)
"""


def test_a_library_the_app_imports_later_gets_its_probe_then_and_only_then(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", LATE_IMPORT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "imported: []",  # a probe's library is not imported for the app
        "measured: ['late.db'] 1",
        "finder left: False",
        "hooked after uninstrument: False",
    ]


def test_httpx_imported_after_instrument_gets_its_probe_without_an_error():
    """httpx imports httpcore (the library its probe hooks) only when a client is made: the
    probe loads then, and nothing is logged as failed."""
    script = """
import asyncio, poolwatch
from starlette.applications import Starlette
poolwatch.instrument(Starlette(), metrics_port=0)
import httpx
async def main():
    async with httpx.AsyncClient():
        pass
asyncio.run(main())
print(poolwatch.agent.agent.probe("httpx") is not None)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "hook failed" not in done.stderr and "Traceback" not in done.stderr, done.stderr
