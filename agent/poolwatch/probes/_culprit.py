"""The culprit rule of the loop probe: which frame of a blocked loop's stack to blame.

Runs on the watchdog's thread only, when a block is caught (never on the loop's path).
"""

from __future__ import annotations

import os
import sysconfig
from types import FrameType
from typing import NamedTuple

from ..context import route_template, scope_on_stack

STACK_SHOWN = 8  # frames in the log line's short stack

_STDLIB = tuple(
    {
        os.path.join(path, "")
        for key in ("stdlib", "platstdlib")
        for path in (sysconfig.get_paths()[key], os.path.realpath(sysconfig.get_paths()[key]))
    }
)
_LIBRARY_DIRS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")
_SCRIPTS = os.path.join(sysconfig.get_paths()["scripts"], "")  # pip's entry points: uvicorn...


APP, LIBRARY, STDLIB = "app", "library", "stdlib"


def code_kind(filename: str, module: str, app_packages: frozenset[str]) -> str:
    """The culprit rule: is this frame the application's, a library's or the stdlib's?

    ``app`` for the package of the module that called ``instrument()``/``watch_event_loop()``
    (its top-level package, or the module itself inside poolwatch, i.e. the demo), wherever it
    is installed. Else ``stdlib`` for poolwatch, generated code (``<frozen ...>``, ``<string>``)
    and the standard library (asyncio, selectors, socket...); ``library`` for anything under
    ``site-packages``/``dist-packages`` (uvicorn, starlette, fastapi, anyio, uvloop, but also
    requests, httpx, a sync DB driver...) and pip's entry-point scripts (``bin/uvicorn``);
    ``app`` for everything else.
    """
    if any(module == p or module.startswith(f"{p}.") for p in app_packages):
        return APP
    if module.partition(".")[0] == "poolwatch" or filename.startswith("<"):
        return STDLIB
    if filename.startswith(_SCRIPTS) or any(part in filename for part in _LIBRARY_DIRS):
        return LIBRARY
    return STDLIB if filename.startswith(_STDLIB) else APP


def app_packages(app_module: str | None) -> frozenset[str]:
    """The packages :func:`code_kind` calls the application's, from the module that called
    ``instrument()``: its top-level package; inside poolwatch (the demo) that module only."""
    module = app_module or ""
    top = module.partition(".")[0]
    return frozenset({module if top == "poolwatch" else top} - {"", "__main__"})


def _where(frame: FrameType) -> str:
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_code.co_qualname}"


class Sample(NamedTuple):
    due: float  # the overdue tick this sample belongs to
    culprit: str | None  # "module:function"; None: the loop was in its own machinery
    stack: list[str]  # innermost first, "module:function:line"
    route: str | None  # "GET /users/{id}" when the block is inside a request


def sample_stack(
    frame: FrameType, due: float, app_packages: frozenset[str], runner: tuple[int, object]
) -> Sample:
    """Name the culprit of a stack, innermost frame first (see :func:`code_kind`).

    No application frame (a library blocked on its own): the outermost library call under the
    framework (:func:`_library_call`). None when the loop was in its own
    machinery (its I/O wait, its dispatch: only ``asyncio``/``selectors`` frames down to
    ``runner``, the frame running the loop), where only the machine can stall it.
    """
    if _in_loop_machinery(frame, runner):
        return Sample(due, None, [], None)
    frames: list[FrameType] = []
    f: FrameType | None = frame
    while f is not None and len(frames) < 256:
        frames.append(f)
        f = f.f_back
    modules = [f.f_globals.get("__name__", "") for f in frames]
    kinds = [
        code_kind(f.f_code.co_filename, m, app_packages)
        for f, m in zip(frames, modules, strict=True)
    ]
    index = next((i for i, kind in enumerate(kinds) if kind == APP), None)
    if index is None:
        index = _library_call(kinds, modules)
    lines = [f"{_where(f)}:{f.f_lineno}" for f in frames[: index + 3]]
    if len(lines) > STACK_SHOWN:
        lines = [*lines[:3], "...", *lines[-(STACK_SHOWN - 4) :]]
    return Sample(due, _where(frames[index]), lines, _route(frames))


# The layers that call into the code being served (servers, ASGI, routing, the loop itself):
# a library-only block is blamed on the outermost frame called by one of them.
FRAMEWORK = (
    "uvicorn",
    "gunicorn",
    "hypercorn",
    "starlette",
    "fastapi.applications",
    "fastapi.routing",
    "anyio",
    "asyncio",
    "uvloop",
    "h11",
    "httptools",
    "poolwatch",
)


def _framework(module: str) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in FRAMEWORK)


def _library_call(kinds: list[str], modules: list[str]) -> int:
    """The frame to blame when no application frame is on the stack (innermost first): the
    outermost library frame of the run of frames above the innermost framework frame, e.g.
    ``fastapi.openapi.utils:get_openapi`` for a schema build deep in pydantic. Where the sampler
    catches the inner frames changes from one block to the next; that call does not, so the
    same block gets the same culprit and the culprit cap is not used up."""
    end = next((i for i, module in enumerate(modules) if _framework(module)), len(modules))
    library = [i for i in range(end) if kinds[i] == LIBRARY]
    if library:
        return library[-1]
    if end:
        return end - 1  # only the standard library above the framework (json.dumps...)
    return next((i for i, kind in enumerate(kinds) if kind == LIBRARY), 0)


def _in_loop_machinery(frame: FrameType, runner: tuple[int, object]) -> bool:
    """Only asyncio/selectors frames between ``frame`` and the frame running the loop?"""
    f: FrameType | None = frame
    while f is not None:
        if (id(f), f.f_code) == runner:
            return True
        module = f.f_globals.get("__name__", "")
        if module != "selectors" and not module.startswith("asyncio."):
            return False
        f = f.f_back
    return False


def _route(frames: list[FrameType]) -> str | None:
    """The route template of the request whose task is blocked (``GET /users/{id}``), never
    the raw path; None outside a request."""
    scope = scope_on_stack(frames)
    if scope is None:
        return None
    path = route_template(scope)
    return f"{scope.get('method', '')} {path}".strip() if path else None
