"""What the current task is serving, for log hints (leak warnings, loop culprits).

The ASGI middleware puts the request's scope in ``request_scope``; routing fills in the matched
route later in the same scope dict, so ``current_route()`` read inside a handler sees it.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

request_scope: ContextVar[dict[str, Any] | None] = ContextVar(
    "poolwatch_request_scope", default=None
)


def current_route() -> str | None:
    """The route template (``/users/{id}``) of the request being served, never the raw path
    (it may carry ids or tokens); the endpoint's ``module:function`` when there is no template;
    None outside a request."""
    scope = request_scope.get()
    if scope is None:
        return None
    from .probes.http_server import route_template

    template = route_template(scope)
    if template is not None:
        return template
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        return f"{getattr(endpoint, '__module__', '?')}:{getattr(endpoint, '__qualname__', '?')}"
    return None
