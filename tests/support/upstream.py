"""A real aiohttp server on loopback, the upstream an app calls: on its own thread
(:class:`Upstream`), or in its own process (:class:`UpstreamProcess`) to be killed mid-request."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import subprocess
import sys
import threading

from aiohttp import web

from .net import free_port, wait_for_port


def host(port: int) -> dict[str, str]:
    """The labels poolwatch gives an upstream on loopback in the aiohttp series."""
    return {"server_address": "127.0.0.1", "server_port": str(port)}


def conns(state: str, port: int) -> dict[str, str]:
    """The labels of its ``http_client_open_connections`` in ``state`` (active, idle)."""
    return {"http_connection_state": state, "url_scheme": "http", **host(port)}


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


class UpstreamProcess:
    """``/slow?delay=S`` (any method) served by ``python -m tests.support.upstream PORT``, which
    prints one line per request received: :meth:`wait_requests` knows when they are in flight."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._lines: queue.Queue[str] = queue.Queue()
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.upstream", str(self.port)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=repo,
        )
        threading.Thread(target=self._read, daemon=True).start()
        try:
            wait_for_port(self.port, proc=self.proc)
        except Exception:
            self.kill()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.strip())

    def url(self, delay: float) -> str:
        return f"http://127.0.0.1:{self.port}/slow?delay={delay}"

    def wait_requests(self, n: int, timeout: float = 10.0) -> list[str]:
        """The next ``n`` requests received (``"GET /slow"``), waiting at most ``timeout``."""
        return [self._lines.get(timeout=timeout) for _ in range(n)]

    def kill(self) -> None:
        """SIGKILL: the process ends at once, the requests it holds get no answer."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


async def _slow_announced(request: web.Request) -> web.Response:
    print(f"{request.method} {request.path}", flush=True)
    return await _slow(request)


def _serve(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/slow", _slow_announced)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
