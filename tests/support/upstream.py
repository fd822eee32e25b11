"""A real aiohttp server on loopback, run on its own thread: the upstream an app calls."""

from __future__ import annotations

import asyncio
import socket
import threading

from aiohttp import web

from .net import free_port, wait_for_port


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "0.2")))
    return web.json_response({"ok": True})


async def _close(request: web.Request) -> web.Response:
    response = web.json_response({"closed": True})
    response.force_close()  # the client's connection ends: its lifetime is recorded
    return response


class Upstream:
    """``with Upstream() as up: up.url`` — routes ``/slow?delay=S`` and ``/close``."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/slow", _slow)
        app.router.add_get("/close", _close)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> Upstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        wait_for_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def refusing_socket() -> socket.socket:
    """A bound, never-listening socket: connecting to its port is refused (and the port stays
    reserved while the socket is open)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock
