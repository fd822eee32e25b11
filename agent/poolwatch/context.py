"""What the current task is serving: the request's scope, and the route template it matched.

The ASGI middleware puts the request's scope in ``request_scope``; routing fills in the matched
route later in the same scope dict, so ``current_route()`` read inside a handler sees it (leak
reports name the route that took a connection). :func:`route_template` turns a scope into its
route's template (``/users/{id}``), never the raw path: the HTTP server probe labels its series
with it, and the loop probe names the request a block happened in.

Templates: Starlette's router leaves ``endpoint`` and ``router`` in the scope on every release,
and ``route`` only on recent ones (and FastAPI's own routes). The router's routes, through
``Mount`` and ``Host``, are walked once into a map from route and endpoint to full template
(``/api/{version}/users/{id}``); a request then costs a dict lookup, and a path match only for an
endpoint served under several templates.

This module imports nothing of poolwatch: probes and the middleware both read it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from contextvars import ContextVar
from types import CodeType, FrameType
from typing import Any

request_scope: ContextVar[dict[str, Any] | None] = ContextVar(
    "poolwatch_request_scope", default=None
)

# Key in a request's ASGI scope: statement -> times it ran in that request (the diagnosis probe
# counts, the middleware hands a request that ran any to the probe when it ends).
QUERIES = "poolwatch.queries"

# The code of PoolwatchMiddleware.__call__ (poolwatch.asgi adds it at import): on a blocked
# loop's stack its frame holds the request's ``scope``. The loop probe reads stacks from another
# thread, where the loop thread's ``request_scope`` cannot be read.
serving_codes: set[CodeType] = set()


def current_route() -> str | None:
    """The route template (``/users/{id}``) of the request being served, never the raw path
    (it may carry ids or tokens); the endpoint's ``module:function`` when there is no template;
    None outside a request."""
    scope = request_scope.get()
    if scope is None:
        return None
    template = route_template(scope)
    if template is not None:
        return template
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        return f"{getattr(endpoint, '__module__', '?')}:{getattr(endpoint, '__qualname__', '?')}"
    return None


def scope_on_stack(frames: Iterable[FrameType]) -> dict[str, Any] | None:
    """The scope of the request being served by the stack ``frames`` (innermost first), read
    from the middleware's frame on it; None outside a request. Nothing is recorded per request
    to make this work."""
    for f in frames:
        if f.f_code in serving_codes:
            scope = f.f_locals.get("scope")
            return scope if isinstance(scope, dict) else None
    return None


class _Routes:
    """The full template of every route of one router (and of its mounted routers), keyed by
    ``id()`` of the route object and of its endpoint. The index lives as long as its router and
    holds no reference to what it names: the router holds its routes, so their ids stay theirs
    (an app built per test is freed with its router; only a route removed from a live router
    could leave a stale id behind)."""

    def __init__(self, router: Any) -> None:
        found: dict[int, list[tuple[str, str] | None]] = {}

        def add(key: Any, entry: tuple[str, str] | None) -> None:
            if key is not None:
                found.setdefault(id(key), []).append(entry)

        def walk(routes: Any, raw: str, fmt: str, depth: int) -> None:
            for route in list(routes or ()) if depth < 16 else ():
                sub = getattr(route, "routes", None)
                if hasattr(route, "host") and sub is not None:  # Host: no path of its own
                    walk(sub, raw, fmt, depth + 1)
                    # the last match, with routes inside: none of them matched
                    entry = None if sub else (fmt + "/{path}", raw + "/{path:path}")
                    add(route, entry)
                    add(getattr(route, "app", None), entry)
                    continue
                path, path_format = getattr(route, "path", None), getattr(route, "path_format", "")
                if not isinstance(path, str) or not isinstance(path_format, str):
                    continue
                if path_format.endswith("/{path}") and hasattr(route, "app") and sub is not None:
                    # a Mount: its routes under its path; a mounted app without routes (static
                    # files, WSGI...) is named by the mount's "/{path}" template
                    mount_fmt = path_format[: -len("/{path}")]
                    if sub:
                        walk(sub, raw + path, fmt + mount_fmt, depth + 1)
                        entry = None
                    else:
                        entry = (fmt + path_format, raw + path + "/{path:path}")
                    add(route, entry)
                    add(route.app, entry)
                    continue
                entry = (fmt + path_format, raw + path)
                add(route, entry)
                add(getattr(route, "endpoint", None), entry)

        walk(getattr(router, "routes", None), "", "", 0)
        self.templates: dict[int, Any] = {key: _resolve(v) for key, v in found.items()}
        self.missed: dict[int, str | None] = {}  # keys found in no route: their own template


def _resolve(entries: list[tuple[str, str] | None]) -> Any:
    """One template: it; none: None (unmatched); several (an endpoint or a route served at more
    than one path): the candidates, each with its regex, in routing order."""
    unique = list(dict.fromkeys(e for e in entries if e is not None))
    if not unique:
        return None
    if len({template for template, _ in unique}) == 1:
        return unique[0][0]
    from starlette.routing import compile_path  # only Starlette routers get here

    return tuple((compile_path(raw)[0], template) for template, raw in unique)


# id(router) -> its routes, dropped when the router is; the HTTP server probe reads it inline
route_indexes: dict[int, _Routes] = {}
_MISSING = object()


def route_template(scope: dict[str, Any]) -> str | None:
    """The template of the route that answered ``scope`` (``/users/{id}``), never the raw path;
    None when nothing matched."""
    key = scope.get("route") or scope.get("endpoint")
    if key is None:
        return None
    router = scope.get("router")
    index = route_indexes.get(id(router)) if router is not None else None
    found: Any = index.templates.get(id(key), _MISSING) if index is not None else _MISSING
    if found.__class__ is str:
        return found
    if found is None:
        return None
    if found is _MISSING:
        found = _slow_lookup(router, key, scope)
        if found is None or found.__class__ is str:
            return found
    return _match(found, scope)


def _slow_lookup(router: Any, key: Any, scope: dict[str, Any]) -> Any:
    """First request of a router, or a route it does not list (added later, or made by the
    framework, like FastAPI's included routers): (re)index, else the route's own template."""
    index = route_indexes.get(id(router)) if router is not None else None
    if router is None or (index is not None and len(index.missed) >= 100):
        return _own_template(key, scope)  # routes made per request: stop re-walking
    rid = id(router)
    if index is None:
        try:
            weakref.finalize(router, route_indexes.pop, rid, None)
        except TypeError:  # a router without weak references: no index
            return _own_template(key, scope)
    fresh = _Routes(router)
    if index is not None:
        fresh.missed.update(index.missed)
        fresh.templates.update(index.missed)
    found = fresh.templates.get(id(key), _MISSING)
    if found is _MISSING:
        found = _own_template(key, scope)
        if scope.get("root_path", "") == scope.get("app_root_path", scope.get("root_path", "")):
            # Outside any Mount the template is the route's alone: remember it for as long as
            # the route lives (a weak reference: no id outlives its object here).
            try:
                weakref.finalize(key, _forget, rid, id(key))
                fresh.missed[id(key)] = fresh.templates[id(key)] = found
            except TypeError:
                pass
    route_indexes[rid] = fresh
    return found


def _forget(rid: int, key: int) -> None:
    index = route_indexes.get(rid)
    if index is not None:
        index.templates.pop(key, None)
        index.missed.pop(key, None)


def _own_template(route: Any, scope: dict[str, Any]) -> str | None:
    """A route no router lists: its own template, under the path of the Mount it is in."""
    template = getattr(route, "path_format", None)
    if not isinstance(template, str):
        return None
    root, after = scope.get("app_root_path"), scope.get("root_path", "")  # a Mount sets both
    prefix = after[len(root) :] if root is not None and after.startswith(root) else ""
    return prefix.rstrip("/") + template


def _match(candidates: tuple[tuple[Any, str], ...], scope: dict[str, Any]) -> str | None:
    """An endpoint served at several paths: the template whose path matches (routing order)."""
    path = scope.get("path", "")
    root = scope.get("app_root_path", scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :]
    for regex, template in candidates:
        if regex.match(path):
            return template
    return candidates[0][1]
