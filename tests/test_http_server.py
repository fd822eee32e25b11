"""Issue 5: HTTP server metrics from ``instrument(app)`` on a real uvicorn."""

from __future__ import annotations

import asyncio
import random
import string

import aiohttp

from tests.support.load import Sampler

APP = "tests.apps.http_app:app"
DURATION = "http_server_request_duration_seconds"


def series(samples, name: str = DURATION) -> set[tuple]:
    return {tuple(sorted(s.labels.items())) for s in samples.find(f"{name}_count")}


async def requests(url: str, paths: list[str], method: str = "GET", parallel: int = 16) -> list:
    limit = asyncio.Semaphore(parallel)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(path: str) -> int:
            async with limit, session.request(method, url + path) as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(one(p) for p in paths))


def count(samples, method: str, route: str, status: str) -> float:
    return samples.value(
        f"{DURATION}_count",
        http_request_method=method,
        http_route=route,
        http_response_status_code=status,
    )


async def test_routes_are_templates_and_methods_statuses_are_labelled(app_server, postgres):
    server = app_server(APP, {"SA_URL": postgres.dsn("postgresql+asyncpg")})
    assert await requests(server.url, [f"/users/{n}" for n in range(40)]) == [200] * 40
    assert await requests(server.url, [f"/api/v2/things/t-{n}" for n in range(7)]) == [200] * 7
    assert await requests(server.url, ["/users/not-a-number"] * 3) == [422] * 3
    assert await requests(server.url, ["/fail"] * 2) == [500] * 2
    created = await requests(server.url, [f"/orders/{n}/items/{n * 2}" for n in range(5)], "POST")
    assert created == [201] * 5
    assert await requests(server.url, ["/users/1"], "PROPFIND") == [405]
    assert await requests(server.url, ["/users/1"], "DELETE") == [405]

    samples = server.scrape()
    assert count(samples, "GET", "/users/{user_id}", "200") == 40
    assert count(samples, "GET", "/api/v2/things/{thing_id}", "200") == 7
    assert count(samples, "GET", "/users/{user_id}", "422") == 3
    assert count(samples, "GET", "/fail", "500") == 2
    assert count(samples, "POST", "/orders/{order_id}/items/{item_id}", "201") == 5
    assert count(samples, "_OTHER", "/users/{user_id}", "405") == 1  # unknown method: semconv
    assert count(samples, "DELETE", "/users/{user_id}", "405") == 1
    routes = {dict(key)["http_route"] for key in series(samples)}
    assert not any(
        any(c.isdigit() for c in route) for route in routes - {"/api/v2/things/{thing_id}"}
    )
    # buckets of the contract, +Inf equal to count; sum is seconds
    labels = {"http_request_method": "GET", "http_route": "/users/{user_id}"}
    labels["http_response_status_code"] = "200"
    assert samples.bucket(DURATION, "+Inf", **labels) == 40
    assert samples.bucket(DURATION, "0.1", **labels) >= 30  # a trivial route, margin for CI
    assert 0 < samples.value(f"{DURATION}_sum", **labels) < 40
    assert samples.value("http_server_active_requests", http_request_method="GET") == 0
    # the pool under the POST route is measured too
    pool = {"db_client_connection_pool_name": f"127.0.0.1:{postgres.port}/app"}
    assert samples.value("db_client_connection_wait_time_seconds_count", **pool) == 5
    assert samples.value("poolwatch_agent_errors_total", probe="asgi") == 0


async def test_a_scan_of_1000_random_404_paths_adds_no_series(app_server):
    server = app_server(APP)
    await requests(server.url, ["/users/1", "/no-such-page"])
    before = series(server.scrape())
    alphabet = string.ascii_lowercase + string.digits + "-_."
    scan = [  # under a prefix no route has: a random "/ok" would rightly answer 200
        "/scan-"
        + "/".join(
            "".join(random.choices(alphabet, k=random.randint(1, 12)))
            for _ in range(random.randint(1, 4))
        )
        for _ in range(1000)
    ]
    statuses = await requests(server.url, scan)
    assert set(statuses) == {404}
    samples = server.scrape()
    assert series(samples) == before
    assert count(samples, "GET", "_UNMATCHED", "404") == 1001
    assert not any(path in samples.text for path in scan[:50])


async def test_active_requests_counts_requests_in_flight(app_server):
    server = app_server(APP)
    with Sampler(server.metrics_url, interval=0.05) as sampler:
        statuses = await requests(server.url, ["/sleep/2.0"] * 5)
    assert statuses == [200] * 5
    in_flight = [
        s.value for sample in sampler.samples for s in sample.find("http_server_active_requests")
    ]
    assert max(in_flight) == 5  # the series appears with the first request
    assert server.scrape().value("http_server_active_requests", http_request_method="GET") == 0


async def test_route_labels_are_capped_by_max_routes(app_server):
    server = app_server(APP, {"POOLWATCH_MAX_ROUTES": "2"})
    await requests(server.url, ["/users/1", "/sleep/0", "/api/v2/things/x", "/fail"], parallel=1)
    routes = {dict(key)["http_route"] for key in series(server.scrape())}
    assert routes == {"/users/{user_id}", "/sleep/{seconds}", "_OTHER"}


async def test_http_server_metrics_can_be_turned_off(app_server):
    server = app_server(APP, {"POOLWATCH_HTTP_SERVER_METRICS": "false"})
    assert await requests(server.url, ["/users/1", "/nope"]) == [200, 404]
    samples = server.scrape()
    assert not samples.find(f"{DURATION}_count")
    assert not samples.find("http_server_active_requests")
    assert samples.find("poolwatch_build_info")
