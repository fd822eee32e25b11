"""ASGI middleware: starts and stops the agent with the app's lifespan; records HTTP metrics."""

from __future__ import annotations

from typing import Any

from .agent import StartupError, agent
from .context import request_scope
from .log import errors, logger
from .probes import http_server

Scope = dict[str, Any]


class PoolwatchMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if not agent.started and agent.settings is not None:
            try:
                agent.start()  # the server runs without lifespan: start on first use
            except StartupError as exc:  # strict mode: still never fail a request for it
                agent.started = True
                errors.degraded("exporter", str(exc))
        # Leak reports are the only reader of the request scope: no context switch per request
        # unless leak detection is on.
        settings = agent.settings
        token = request_scope.set(scope) if settings and settings.leak_threshold else None
        try:
            if scope["type"] == "http" and (stats := http_server.stats) is not None:
                await stats.serve(self.app, scope, receive, send)  # HTTP server metrics
            else:
                await self.app(scope, receive, send)
        finally:
            if token is not None:
                request_scope.reset(token)

    @staticmethod
    def _lifespan_send(send: Any) -> Any:
        async def lifespan_send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete" and agent.settings is not None:
                try:
                    agent.start()  # after the app's own start-up: its pools exist by now
                except StartupError as exc:  # only with POOLWATCH_STRICT=true
                    # logged too: some lifespan drivers (asgi-lifespan) drop the message
                    logger.error(str(exc))
                    message = {"type": "lifespan.startup.failed", "message": str(exc)}
            elif kind == "lifespan.shutdown.complete":
                agent.stop()
            await send(message)

        return lifespan_send
