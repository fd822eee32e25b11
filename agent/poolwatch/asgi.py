"""ASGI middleware: starts and stops the agent with the app's lifespan; records HTTP metrics.

It is handed the agent it serves, as Starlette middlewares are handed their settings::

    app.add_middleware(PoolwatchMiddleware, agent=poolwatch.agent.agent)

(``instrument(app)`` does exactly that.) Per request it reads that agent's state only: whether
it started, whether leak detection wants the request's scope, and the HTTP server probe's
recorder (``agent.http_server``, None when those metrics are off or stepped aside).
"""

from __future__ import annotations

from typing import Any

from ._agent import Agent, StartupError
from ._log import errors, logger
from .context import QUERIES, request_scope, serving_codes

Scope = dict[str, Any]


class PoolwatchMiddleware:
    def __init__(self, app: Any, *, agent: Agent) -> None:
        self.app = app
        self.agent = agent

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        agent = self.agent
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if not agent.started and agent.settings is not None:
            try:
                agent.start()  # the server runs without lifespan: start on first use
            except StartupError as exc:  # strict mode: still never fail a request for it
                agent.started = True
                errors.degraded("exporter", str(exc))
        # Leak reports and the diagnosis are the readers of the request scope: no context
        # switch per request unless one of them is on.
        settings = agent.settings
        diagnosis = agent.diagnosis
        token = (
            request_scope.set(scope)
            if diagnosis is not None or (settings and settings.leak_threshold)
            else None
        )
        try:
            if scope["type"] == "http" and (recorder := agent.http_server) is not None:
                await recorder.serve(self.app, scope, receive, send)  # HTTP server metrics
            else:
                await self.app(scope, receive, send)
        finally:
            if token is not None:
                request_scope.reset(token)
            if diagnosis is not None and QUERIES in scope:  # a request that ran queries
                diagnosis.finished(scope)  # queries per request; catches its own errors

    def _lifespan_send(self, send: Any) -> Any:
        agent = self.agent

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
                if (diagnosis := agent.diagnosis) is not None:
                    diagnosis.shutdown_done()  # what the app's shutdown left open
                agent.stop()
            await send(message)

        return lifespan_send


# its frame on a blocked loop's stack names the request (the loop probe's block lines)
serving_codes.add(PoolwatchMiddleware.__call__.__code__)
