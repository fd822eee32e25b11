"""Routes that only Starlette's router names: a pure Starlette app (``app``) and a FastAPI app
(``api``) with ``add_route``, ``Mount``, ``Host``, its own ``/openapi.json`` and two Prometheus
endpoints of the app's own. Served by uvicorn on any Starlette from 0.36 (FastAPI 0.110) on:
older releases put only ``endpoint`` and ``router`` into the scope, not ``route``.
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, make_asgi_app
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Host, Mount, Route, Router

from poolwatch import instrument


async def item(request):
    return JSONResponse({"item": request.path_params["item_id"]})


async def shared(request):  # one endpoint served at two paths: told apart by path
    return PlainTextResponse(request.url.path)


async def user(request):
    return JSONResponse(dict(request.path_params))


async def block_loop(request):
    time.sleep(float(request.path_params["seconds"]))  # blocks the event loop, on purpose
    return PlainTextResponse("blocked")


async def raw_asgi(scope, receive, send):  # a mounted app that is no router (static files...)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"raw"})


async def status(request):
    return PlainTextResponse("ok")


def _starlette_routes() -> list:
    return [
        Route("/items/{item_id:int}", item),
        Route("/same-a", shared),
        Route("/same-b", shared),
        Route("/block/{seconds}", block_loop),
        Mount("/api/{version}", routes=[Route("/users/{user_id}", user)]),
        Mount("/raw", app=raw_asgi),
        Host("status.example", app=Router(routes=[Route("/health", status)])),
    ]


app = Starlette(routes=_starlette_routes())
instrument(app)


api = FastAPI()


@api.get("/users/{user_id}")
async def api_user(user_id: int):
    return {"user": user_id}


async def plain(request):
    return PlainTextResponse(request.path_params["name"])


async def app_metrics(request):  # what starlette-exporter's handle_metrics does
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def not_prometheus(request):  # a JSON "/stats" of the app's own: app traffic
    return JSONResponse({"orders": 3})


api.add_route("/plain/{name}", plain)
api.add_route("/internal/prometheus", app_metrics)
api.add_route("/stats", not_prometheus)
api.mount("/metrics", make_asgi_app())  # prometheus_client's own ASGI app
api.mount("/legacy", Starlette(routes=[Route("/items/{item_id:int}", item)]))
instrument(api)
