"""Issue 3: aiohttp client connection pools, with real aiohttp upstreams on loopback.

The first tests run a FastAPI app under uvicorn (``tests/apps/aiohttp_app.py``) whose session is
made in its lifespan after ``instrument(app)``; the others instrument this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from dataclasses import dataclass

import aiohttp
import pytest

from tests.support import planted
from tests.support.load import Sampler
from tests.support.net import Samples, free_port, scrape
from tests.support.upstream import Upstream, conns, host, refusing_socket

APP = "tests.apps.aiohttp_app:app"
OPEN = "http_client_open_connections"
PENDING = "aiohttp_client_pending_requests"
LIMIT = "aiohttp_client_connection_limit"
WAIT = "aiohttp_client_connection_wait_time_seconds"
DURATION = "http_client_connection_duration_seconds"
ERRORS = "aiohttp_client_errors_total"
AGENT_ERRORS = "poolwatch_agent_errors_total"


def peak(sampler: Sampler, name: str, **labels: str) -> float:
    """The largest value seen during the load (a series appears with its host's first request)."""
    return max(sum(x.value for x in s.find(name, **labels)) for s in sampler.samples)


async def call_all(urls: list[str]) -> list[dict]:
    """GET every URL concurrently from a plain (uninstrumented) client; the JSON bodies."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:

        async def one(url: str) -> dict:
            async with client.get(url) as response:
                return await response.json()

        return await asyncio.gather(*(one(url) for url in urls))


OK = '{"ok": true}'  # what the upstream answers


@dataclass
class Slow:
    """A real aiohttp upstream (its own thread and loop) whose ``/slow`` takes ``delay`` s."""

    upstream: Upstream
    delay: float

    @property
    def port(self) -> int:
        return self.upstream.port

    def url(self, delay: float | None = None) -> str:
        return f"{self.upstream.url}/slow?delay={self.delay if delay is None else delay}"


@pytest.fixture
def upstreams():
    with contextlib.ExitStack() as stack:
        yield lambda delay=0.2: Slow(stack.enter_context(Upstream()), delay)


# --- a FastAPI app under uvicorn ----------------------------------------------------------------
async def test_slow_upstream_queues_behind_the_limits(app_server, upstreams):
    # 0.4 s, not the 0.2 s: wide margins for telling queued requests apart on a busy box
    upstream = upstreams(0.4)
    server = app_server(APP, {"UPSTREAM_SLOW": upstream.url(), "LIMIT": "2", "LIMIT_PER_HOST": "2"})
    with Sampler(server.metrics_url) as sampler:
        results = await call_all([f"{server.url}/call/slow"] * 10)
    after = server.scrape()

    assert [r["body"] for r in results] == [OK] * 10
    label = host(upstream.port)
    # during the load: the connector is full, the rest wait
    assert peak(sampler, OPEN, **conns("active", upstream.port)) == 2
    assert peak(sampler, PENDING, **label) > 0
    assert peak(sampler, LIMIT, scope="per_host") == 2
    assert peak(sampler, LIMIT, scope="total") == 2
    # afterwards: nothing active or waiting, the connections kept alive for reuse
    assert after.value(OPEN, **conns("active", upstream.port)) == 0
    assert 1 <= after.value(OPEN, **conns("idle", upstream.port)) <= 2
    assert after.value(PENDING, **label) == 0
    # every request that queued (it took two upstream round trips or more) was timed, once
    queued = sum(r["elapsed"] > 0.6 for r in results)
    assert queued >= 6, [round(r["elapsed"], 3) for r in results]
    assert after.value(f"{WAIT}_count", **label) == queued
    assert after.bucket(WAIT, "0.25", **label) == 0  # each waited >= one 0.4 s round trip
    assert after.bucket(WAIT, "+Inf", **label) == queued
    assert after.value(AGENT_ERRORS, probe="aiohttp") == 0


SECRETS = (planted.URL_USER, planted.URL_PASSWORD, planted.URL_TOKEN, "token", "delay", "/slow")


def with_secrets(url: str) -> str:
    """``url`` with a user, a password and a token in its query string."""
    return planted.with_credentials(url)


async def test_two_hosts_are_told_apart_and_no_url_part_leaks(app_server, upstreams):
    a, b = upstreams(0.6), upstreams(0.6)  # wide enough for scrapes on a busy box
    secret_url = with_secrets(b.url())
    # no per-host limit: aiohttp keeps no per-host sets, poolwatch maps connections to hosts
    server = app_server(APP, {"UPSTREAM_A": a.url(), "UPSTREAM_B": secret_url})
    with Sampler(server.metrics_url) as sampler:
        results = await call_all([f"{server.url}/call/a"] * 3 + [f"{server.url}/call/b"] * 2)
    after = server.scrape()
    log = server.log()

    assert [r["body"] for r in results] == [OK] * 5
    assert peak(sampler, OPEN, **conns("active", a.port)) == 3
    assert peak(sampler, OPEN, **conns("active", b.port)) == 2
    # no per-host limit: no series to divide by (0 would mean "unlimited", not "full")
    assert not any(s.find(LIMIT, scope="per_host") for s in sampler.samples)
    for port, idle in ((a.port, 3), (b.port, 2)):
        assert after.value(OPEN, **conns("active", port)) == 0
        assert after.value(OPEN, **conns("idle", port)) == idle
    for sample in after.samples:
        for value in sample.labels.values():
            assert not any(secret in value for secret in SECRETS), sample
        if "server_address" in sample.labels:
            assert sample.labels["server_address"] == "127.0.0.1"
            assert sample.labels["server_port"] in (str(a.port), str(b.port))
    for secret in SECRETS[:3]:
        assert secret not in after.text and secret not in log


async def test_refused_connections_are_counted_per_host(app_server, upstreams):
    healthy = upstreams(0.0)
    with refusing_socket() as refusing:
        port = refusing.getsockname()[1]
        url = f"http://127.0.0.1:{port}/slow"
        env = {"UPSTREAM_DOWN": url, "UPSTREAM_UP": healthy.url(0)}
        # the asyncio loop, like this process: uvloop words the refusal differently
        server = app_server(APP, env, server_args=["--loop", "asyncio"])
        results = await call_all([f"{server.url}/call/down"] * 3 + [f"{server.url}/call/up"])
        # the same request from a session poolwatch has never seen
        async with aiohttp.ClientSession() as bare:
            with pytest.raises(aiohttp.ClientError) as raised:
                await bare.get(url)
    after = server.scrape()

    expected = f"{type(raised.value).__module__}.{type(raised.value).__qualname__}"
    assert expected == "aiohttp.client_exceptions.ClientConnectorError"
    for result in results[:3]:
        assert result == {"error": expected, "message": str(raised.value)}
    assert results[3]["body"] == OK
    assert after.value(ERRORS, error_type="ClientConnectorError", **host(port)) == 3
    assert not after.find(ERRORS, **host(healthy.port))
    assert after.value(AGENT_ERRORS, probe="aiohttp") == 0


async def test_hosts_beyond_the_cap_share_other(app_server, upstreams):
    ups = [upstreams(0.0) for _ in range(3)]
    env = {f"UPSTREAM_U{i}": u.url(0) for i, u in enumerate(ups)}
    server = app_server(APP, {**env, "POOLWATCH_HTTP_CLIENT_MAX_HOSTS": "2"})
    for i in range(3):  # one after the other: the first two hosts are the ones named
        await call_all([f"{server.url}/call/u{i}"] * 2)
    after = server.scrape()

    for upstream in ups[:2]:
        assert after.value(OPEN, **conns("idle", upstream.port)) == 2
    assert not after.find(OPEN, server_port=str(ups[2].port))
    other = {"server_address": "other", "server_port": ""}
    assert after.value(OPEN, http_connection_state="idle", **other) == 2
    assert after.value(f"{DURATION}_count", **other) == 0
    addresses = {s.labels.get("server_address") for s in after.find(OPEN)}
    assert addresses == {"127.0.0.1", "other"}


# --- this process, instrumented -------------------------------------------------------------
def metrics(agent) -> Samples:
    return scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")


async def get(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        return await response.text()


async def test_closed_session_disappears_and_connection_lifetimes_are_recorded(agent, upstreams):
    upstream = upstreams(0.05)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=5))
    await asyncio.gather(*(get(session, upstream.url()) for _ in range(3)))
    before = await asyncio.to_thread(metrics, agent)
    assert before.value(OPEN, **conns("idle", upstream.port)) == 3
    assert before.value(LIMIT, scope="total") == 5
    assert before.value(f"{DURATION}_count", **host(upstream.port)) == 0

    await session.close()
    await asyncio.sleep(0.05)  # connection_lost runs on the next loop iterations
    after = await asyncio.to_thread(metrics, agent)
    assert not after.find(OPEN) and not after.find(LIMIT) and not after.find(PENDING)
    assert after.value(f"{DURATION}_count", **host(upstream.port)) == 3
    assert after.value(f"{DURATION}_sum", **host(upstream.port)) > 3 * 0.05


async def test_collected_session_disappears(agent, upstreams):
    upstream = upstreams(0.0)
    session = aiohttp.ClientSession()
    await get(session, upstream.url(0))
    assert (await asyncio.to_thread(metrics, agent)).find(OPEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # never closed, on purpose
        del session
        gc.collect()
    assert not (await asyncio.to_thread(metrics, agent)).find(OPEN)


async def test_requests_cancelled_while_queued_leave_no_trace(agent, upstreams):
    upstream = upstreams(0.3)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        holder = asyncio.create_task(get(session, upstream.url()))
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(get(session, upstream.url())) for _ in range(5)]
        await asyncio.sleep(0.05)
        during = await asyncio.to_thread(metrics, agent)
        for task in queued:
            task.cancel()
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert await holder == OK
        after = await asyncio.to_thread(metrics, agent)
    label = host(upstream.port)
    assert during.value(PENDING, **label) == 5
    assert after.value(PENDING, **label) == 0
    assert after.value(f"{WAIT}_count", **label) == 0  # only completed waits are timed
    assert not after.find(ERRORS)  # cancellation is not an upstream error
    assert after.value(AGENT_ERRORS, probe="aiohttp") == 0


async def test_named_sessions_get_their_own_series(agent, upstreams):
    import poolwatch

    upstream = upstreams(0.0)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=3)) as billing,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=7)) as anonymous,
    ):
        assert poolwatch.watch_aiohttp_session(billing, name="billing") is billing
        await get(billing, upstream.url(0))
        await get(anonymous, upstream.url(0))
        samples = await asyncio.to_thread(metrics, agent)
    session = "aiohttp_client_session_name"
    assert samples.value(LIMIT, scope="total", **{session: "billing"}) == 3
    assert samples.value(LIMIT, scope="total", **{session: ""}) == 7
    idle = conns("idle", upstream.port)
    assert samples.value(OPEN, **idle, **{session: "billing"}) == 1
    assert samples.value(OPEN, **idle, **{session: ""}) == 1


async def test_sessions_made_before_instrument_are_found_and_everything_undone(
    clean_agent, upstreams
):
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.connector import BaseConnector

    import poolwatch
    from poolwatch.agent import agent

    originals = {
        (cls, name): vars(cls).get(name)
        for cls, name in (
            (aiohttp.ClientSession, "__init__"),
            (aiohttp.ClientSession, "_request"),
            (BaseConnector, "_wait_for_available_connection"),
            (ResponseHandler, "connection_lost"),
            (aiohttp.TCPConnector, "_create_connection"),
            (aiohttp.UnixConnector, "_create_connection"),
        )
    }
    upstream = upstreams(0.2)
    user_traces = [aiohttp.TraceConfig()]  # a list users share between sessions
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), trace_configs=user_traces
    )
    poolwatch.instrument(metrics_port=free_port())
    agent.start()
    await asyncio.gather(get(session, upstream.url()), get(session, upstream.url()))
    samples = await asyncio.to_thread(metrics, agent)
    assert samples.value(f"{WAIT}_count", **host(upstream.port)) == 1
    assert samples.value(OPEN, **conns("idle", upstream.port)) == 1
    assert session.trace_configs == user_traces  # the user's tracing is left alone
    poolwatch.uninstrument()  # everything undone:
    assert session.trace_configs == user_traces
    assert not hasattr(session.connector, "_poolwatch_state")
    for (cls, name), original in originals.items():
        assert vars(cls).get(name) is original, f"{cls.__name__}.{name} not restored"
    assert await get(session, upstream.url(0)) == OK
    await session.close()


async def test_unreadable_private_state_is_left_out_and_counted_once(agent, upstreams, monkeypatch):
    from poolwatch.probes import aiohttp as probe

    # what a future aiohttp that renames its waiters attribute looks like to poolwatch
    monkeypatch.setattr(probe, "WAITERS_ATTR", "_waiters_renamed")
    upstream = upstreams(0.0)
    before = (await asyncio.to_thread(metrics, agent)).value(AGENT_ERRORS, probe="aiohttp")
    async with aiohttp.ClientSession() as session:
        assert await get(session, upstream.url(0)) == OK
        first = await asyncio.to_thread(metrics, agent)
        assert await get(session, upstream.url(0)) == OK
        second = await asyncio.to_thread(metrics, agent)
    assert not first.find(PENDING) and not second.find(PENDING)
    assert second.value(OPEN, **conns("idle", upstream.port)) == 1  # the rest is still there
    assert second.value(AGENT_ERRORS, probe="aiohttp") == before + 1


class HookBug(Exception):
    """Stands for a bug inside poolwatch's hooks."""


async def test_hook_failures_reach_neither_the_request_nor_the_log(
    agent, upstreams, monkeypatch, capsys
):
    from poolwatch.probes import aiohttp as probe

    kinds = iter(range(1000))

    def broken(host, port):  # a new kind each time: every failure is logged, not just the first
        raise type(f"HookBug{next(kinds)}", (HookBug,), {})("bug in poolwatch")

    monkeypatch.setattr(probe, "_host", broken)  # every hook that labels a host now fails
    upstream = upstreams(0.1)
    secret = with_secrets(upstream.url())
    before = (await asyncio.to_thread(metrics, agent)).value(AGENT_ERRORS, probe="aiohttp")
    with refusing_socket() as refusing:
        refused = with_secrets(f"http://127.0.0.1:{refusing.getsockname()[1]}/?t=1")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            # new connection (_create_connection), a queued request (wait), a refused one (error)
            assert await asyncio.gather(get(session, secret), get(session, secret)) == [OK] * 2
            with pytest.raises(aiohttp.ClientConnectorError):
                await get(session, refused)
    after = (await asyncio.to_thread(metrics, agent)).value(AGENT_ERRORS, probe="aiohttp")
    assert after - before >= 3
    out = capsys.readouterr()
    assert "HookBug" in out.out + out.err  # logged (once), with its traceback...
    for text in SECRETS[:3]:
        assert text not in out.out + out.err  # ...but not the frames' local variables


async def test_an_aiohttp_without_the_wait_method_loses_only_the_wait_series(
    clean_agent, upstreams, monkeypatch
):
    from aiohttp.connector import BaseConnector

    import poolwatch
    from poolwatch._log import errors
    from poolwatch.agent import agent

    # aiohttp < 3.10.11 waits for a connection inline in connect(): nothing to wrap. (This
    # aiohttp needs the method only when a request queues, which none does here.)
    monkeypatch.delattr(BaseConnector, "_wait_for_available_connection")
    upstream = upstreams(0.0)
    before = errors.counts["aiohttp"]  # counted since the process began
    poolwatch.instrument(metrics_port=free_port())
    agent.start()
    async with aiohttp.ClientSession() as session:
        assert await get(session, upstream.url()) == OK
        samples = await asyncio.to_thread(metrics, agent)
    assert not samples.find(WAIT)
    assert samples.value(OPEN, **conns("idle", upstream.port)) == 1
    assert samples.value(AGENT_ERRORS, probe="aiohttp") == before + 1
