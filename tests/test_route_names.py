"""Every matched route is named by its template, on every Starlette from 0.36 on (real uvicorn).

Starlette before 1.x's newest releases leaves no ``route`` in the scope: plain ``Route`` objects
(a pure Starlette app, FastAPI's ``/openapi.json`` and ``/docs``, ``add_route``) were counted
as ``_UNMATCHED``. ``scripts/test-starlette-versions`` runs this file on the oldest and newest
releases poolwatch supports.
"""

from __future__ import annotations

import re

import httpx
import starlette
from starlette.responses import PlainTextResponse

from tests.support.net import wait_for

APP = "tests.apps.starlette_app"
DURATION = "http_server_request_duration_seconds_count"


def served(url: str, paths: list[str], headers: dict[str, str] | None = None) -> list[int]:
    with httpx.Client(base_url=url, headers=headers, follow_redirects=False, timeout=10) as c:
        return [c.get(path).status_code for path in paths]


def routes(samples) -> dict[tuple[str, str], float]:
    return {
        (s.labels["http_route"], s.labels["http_response_status_code"]): s.value
        for s in samples.find(DURATION)
    }


def test_pure_starlette_routes_are_named_by_their_templates(app_server):
    server = app_server(f"{APP}:app")
    paths = ["/items/3", "/items/4", "/same-a", "/same-b", "/same-b"]
    paths += ["/api/v1/users/7", "/api/v2/users/8", "/raw/any/thing", "/nope", "/api/v1/nope"]
    assert served(server.url, paths) == [200] * 8 + [404] * 2
    assert served(server.url, ["/health"], {"host": "status.example"}) == [200]
    found = routes(server.scrape())
    assert found == {
        ("/items/{item_id}", "200"): 2,
        ("/same-a", "200"): 1,  # one endpoint at two paths: each path its own template
        ("/same-b", "200"): 2,
        ("/api/{version}/users/{user_id}", "200"): 2,  # a Mount's parameters stay templates
        ("/raw/{path}", "200"): 1,  # a mounted app that is no router
        ("/health", "200"): 1,  # under a Host
        ("_UNMATCHED", "404"): 2,  # only what matched nothing
    }, starlette.__version__


def test_fastapi_docs_add_route_and_mounts_are_named(app_server):
    server = app_server(f"{APP}:api")
    paths = ["/users/1", "/openapi.json", "/docs", "/plain/x", "/plain/y", "/legacy/items/5"]
    paths += ["/stats"]
    assert served(server.url, paths) == [200] * 7
    found = routes(server.scrape())
    assert found == {
        ("/users/{user_id}", "200"): 1,
        ("/openapi.json", "200"): 1,
        ("/docs", "200"): 1,
        ("/plain/{name}", "200"): 2,
        ("/legacy/items/{item_id}", "200"): 1,
        ("/stats", "200"): 1,  # JSON of the app's own: app traffic
    }, starlette.__version__


def test_the_apps_own_prometheus_endpoints_are_not_app_traffic(app_server):
    server = app_server(f"{APP}:api")
    scrapes = ["/metrics/", "/internal/prometheus"] * 3
    assert served(server.url, [*scrapes, "/users/2"]) == [200] * 7
    samples = server.scrape()
    assert routes(samples) == {("/users/{user_id}", "200"): 1}
    assert "# HELP" in httpx.get(f"{server.url}/internal/prometheus").text  # really Prometheus


def test_loop_block_lines_name_the_route_template(app_server):
    server = app_server(f"{APP}:app")
    assert served(server.url, ["/block/0.3"]) == [200]
    line = wait_for(
        lambda: next((x for x in server.log().splitlines() if "event loop blocked" in x), None),
        timeout=5,
        what="the block's log line",
    )
    assert re.search(r"route='?GET /block/\{seconds\}", line), line
    assert "/block/0.3" not in line  # the template, never the raw path


async def test_apps_built_per_test_are_named_and_freed(clean_agent):
    """A test suite that builds an app per test and drives it in-process (asgi-lifespan and
    httpx): each app's routes are named, and each app is freed with its router."""
    import gc

    from asgi_lifespan import LifespanManager
    from fastapi import FastAPI

    import poolwatch
    from poolwatch.testing import snapshot

    async def plain(request):
        return PlainTextResponse("plain")

    def make_app() -> FastAPI:
        api = FastAPI()

        @api.get("/users/{user_id}")
        async def user(user_id: int):
            return {"user": user_id}

        api.add_route("/plain", plain)
        return poolwatch.instrument(api, metrics_port=0)

    for _ in range(10):
        app = make_app()
        async with LifespanManager(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
                for path in ("/users/1", "/openapi.json", "/plain"):
                    assert (await c.get(path)).status_code == 200
    counts = {
        s.labels["http_route"]: s.value
        for s in snapshot().find("http_server_request_duration_seconds_count")
    }
    assert counts == {"/users/{user_id}": 10, "/openapi.json": 10, "/plain": 10}
    del app, transport, c
    gc.collect()
    assert sum(isinstance(o, FastAPI) for o in gc.get_objects()) == 0
