"""The shapes the runtime's parts agree on, written as Protocols so that no part imports another
just to name its type: a metric :class:`Source`, the :class:`Host` a probe is installed into
(the agent, as probes see it), and the :class:`Probe` contract every ``poolwatch.probes`` module
follows (see ``probes/__init__.py``). Importing nothing of poolwatch but ``config`` and
``metrics`` keeps this module at the bottom of the import graph.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from .config import Settings
from .metrics import Point

Undo = Callable[[], None]  # puts back what a hook placed
Stop = Callable[[], None]  # stops what a probe started


class Source(Protocol):
    """Something the registry reads at collect time (a pool's stats, a loop's watcher...)."""

    probe: str  # the probe label its errors are counted under

    def points(self) -> Iterable[Point]:
        """Current values; called from the exporter's thread at collect time."""
        ...

    def alive(self) -> bool:
        """False once the watched object is gone: the source is then dropped."""
        ...


class Sources(Protocol):
    """The agent's registry as probes use it."""

    def add(self, source: Source) -> None: ...

    def remove(self, source: Source) -> None: ...

    def sources(self) -> list[Source]: ...

    def claim_name(self, wanted: str) -> str: ...


class HttpServer(Source, Protocol):
    """The HTTP server probe's recorder, which ``PoolwatchMiddleware`` hands each request to."""

    on_route: Callable[[str, str], None] | None  # tracing mode: names the server span

    def serve(self, app: Any, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        """Run ``app`` on one HTTP request, timing it."""
        ...

    def route_label(self, scope: dict[str, Any]) -> str:
        """The ``http.route`` label of a request (its template, capped)."""
        ...

    def requests_by_route(self) -> dict[str, int]:
        """Requests answered so far per ``http.route`` label."""
        ...


class Diagnosis(Source, Protocol):
    """The diagnosis probe's detectors, which ``PoolwatchMiddleware`` tells about requests."""

    def finished(self, scope: dict[str, Any]) -> None:
        """One HTTP request that ran queries ended (its ``scope``)."""
        ...

    def shutdown_done(self) -> None:
        """The app's lifespan shutdown finished."""
        ...


class Host(Protocol):
    """The agent as a probe sees it (``poolwatch._agent.Agent``)."""

    @property
    def registry(self) -> Sources: ...

    @property
    def settings(self) -> Settings | None: ...

    @property
    def discovering(self) -> bool:
        """True after ``instrument()``: creation hooks watch what the app makes."""
        ...

    @property
    def app_module(self) -> str | None:
        """The module that called ``instrument()``: its package is the application's code."""
        ...

    http_server: HttpServer | None  # set by the http_server probe while installed
    diagnosis: Diagnosis | None  # set by the diagnosis probe while installed

    def add_undo(self, undo: Undo) -> None:
        """Run ``undo`` at ``uninstrument()`` (state placed on one watched object)."""
        ...

    def probe(self, name: str) -> Probe | None:
        """The probe ``name`` if it is on (installed), else None."""
        ...


class Hooks(Protocol):
    """What a probe's ``install()`` places its class-level hooks with (``_patching.Hooks``)."""

    def wrap(
        self,
        cls: type,
        name: str,
        make: Callable[[Callable[..., Any]], Callable[..., Any]],
        params: str,
        *,
        override: bool = False,
    ) -> None: ...

    def require(self, cls: type, name: str, params: str) -> None: ...

    def feature(
        self,
        cls: type,
        name: str,
        make: Callable[[Callable[..., Any]], Callable[..., Any]],
        params: str,
    ) -> bool: ...

    def on_undo(self, undo: Undo) -> None: ...


class Probe(Protocol):
    """The probe contract: what every module named in ``probes.PROBES`` defines. The prose
    version, with the rules a probe follows, is the docstring of ``poolwatch/probes/__init__.py``.
    """

    @property
    def PROBE(self) -> str:
        """The label of ``poolwatch_agent_errors_total{probe}`` its failures are counted under."""
        ...

    @property
    def WATCHES(self) -> type | tuple[type, ...] | None:
        """The class whose instances made before ``instrument()`` it adopts (None: none; a
        tuple: the classes of a library whose sync and async pools share no base)."""
        ...

    def install(self, agent: Host, hooks: Hooks) -> None: ...

    def existing(self, agent: Host, obj: Any) -> None: ...

    def watch(self, agent: Host, obj: Any, name: str | None = None) -> Any: ...

    def start(self, agent: Host) -> Stop | None: ...
