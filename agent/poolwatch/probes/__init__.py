"""Probes: one module per watched library, on the app's hot path. The probe contract.

A probe is one module ``poolwatch/probes/<name>.py`` plus one line in :data:`PROBES` below. The
agent (``poolwatch._agent``) drives every probe the same way, in this order:

1. **Version range.** The line names the library the probe hooks (its import name) and the
   releases it was tested with, the range of the library's extra in pyproject.toml (a test
   checks they agree; ``scripts/test-<library>-versions`` runs the probe's tests on the oldest
   and the newest). The range is checked before the module is imported: outside it, or without
   the library, the probe stays off (one warning line, the app unchanged).
2. ``install(agent, hooks) -> None``, once per ``instrument()`` after ``uninstrument()``: the
   class-level hooks, every one placed through ``hooks`` (``_patching.Hooks``). ``hooks.wrap``
   checks the target first (it exists, is callable, has the shape the wrapper assumes) and raises
   ``TargetChanged`` if not: the agent then undoes what this probe already placed, counts one
   error under its ``PROBE`` label, logs one line, and the probe is off; ``instrument()`` goes
   on with the others. ``hooks.feature`` is for a hook one series needs: a changed target
   leaves that series out. State set up beside the hooks is registered with ``hooks.on_undo``.
3. ``WATCHES`` and ``existing(agent, obj)``: the class whose instances made before
   ``instrument()`` the probe adopts (``None``: none; a tuple of classes for a library whose
   sync and async pools share no base). The agent walks the heap once for every probe and
   hands each instance of exactly that class or a subclass to ``existing``.
4. ``watch(agent, obj, name=None)``: measure one object, from the public ``watch_*()`` function,
   from a creation hook (``_patching.watch_new_instances``) or from ``existing``. Idempotent;
   ``name`` renames. State placed on the object is undone through ``agent.add_undo``.
5. ``start(agent) -> stop | None``: when the agent starts, inside the app's running loop
   (threads, timers); the agent calls ``stop`` at shutdown.
6. **Undo.** ``uninstrument()`` runs every undo in reverse order: the library is as it was.

Rules for the code a hook runs: only O(1) updates on the hot path (one dict set or pop, a
``deque.append``, no lock, no allocation-heavy work: sizes are read at collect time by a
``Source`` in the registry); catch its own errors (``_log.errors.record(PROBE, exc)``), always
re-raise ``CancelledError``, never block the loop, never log or label a secret. ``PROBE`` is the
label of ``poolwatch_agent_errors_total{probe}`` its failures are counted under. The
``_types.Probe`` Protocol is the same contract for the type checker.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # the type checker holds every probe module to the contract (_types.Probe)
    from .._types import Probe
    from . import (
        aiohttp,
        asyncpg,
        diagnosis,
        http_server,
        httpx,
        leaks,
        loop,
        psycopg_pool,
        redis,
        sqlalchemy,
    )

    _sqlalchemy: Probe = sqlalchemy
    _asyncpg: Probe = asyncpg
    _leaks: Probe = leaks
    _aiohttp: Probe = aiohttp
    _loop: Probe = loop
    _http_server: Probe = http_server
    _httpx: Probe = httpx
    _redis: Probe = redis
    _psycopg_pool: Probe = psycopg_pool
    _diagnosis: Probe = diagnosis


class Line(NamedTuple):
    """One probe: the library it hooks (import name; None: the standard library only) and the
    releases it is tested with (as in pyproject's extra; None: no range)."""

    library: str | None = None
    supported: str | None = None


# probe name (its module in this package) -> what it hooks, in the order they are installed
PROBES: dict[str, Line] = {
    "sqlalchemy": Line("sqlalchemy", ">=2.0"),
    "asyncpg": Line("asyncpg", ">=0.29"),
    "leaks": Line(),  # the checker thread of POOLWATCH_LEAK_THRESHOLD (both pool probes)
    "aiohttp": Line("aiohttp", ">=3.10.11,<4"),
    "httpx": Line("httpcore", ">=1.0.5,<2"),  # httpx's pools are httpcore's
    "redis": Line("redis", ">=5.0,<9"),
    "psycopg_pool": Line("psycopg_pool", ">=3.2,<4"),
    "loop": Line(),
    "http_server": Line(),  # requests come through PoolwatchMiddleware
    "diagnosis": Line(),  # anti-patterns; hooks each library present (after the probes above)
}


def installed(library: str) -> str | None:
    """The installed release: its distribution metadata, else the module's ``__version__``."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(library)
        version = getattr(module, "__version__", None)
        return version if isinstance(version, str) else None


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match[1].split("."))


def within(version: str, spec: str) -> bool:
    """``version`` inside ``spec`` (comma-separated ``>=X``, ``<X``, ``>X``, ``<=X``, ``==X``),
    compared on release numbers only: a pre-release counts as its release, which is as close as
    a probe's checks need."""
    have = _release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = re.match(r"(>=|<=|==|>|<)\s*(.+)", clause)
        if match is None:
            raise ValueError(f"not a version range: {spec!r}")
        op, bound = match.groups()
        want = _release(bound)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, ">": a > b, "<": a < b}[op]
        if not ok:
            return False
    return True


def refusal(probe: str) -> str | None:
    """None when the probe may load (its library installed inside its range), else the one-line
    warning that says the probe is off and what to do."""
    library, spec = PROBES[probe]
    if library is None or spec is None:
        return None
    version = installed(library)
    if version is not None:
        try:
            if within(version, spec):
                return None
        except ValueError:
            pass
    found = f"{library} {version} is installed" if version else f"{library}'s version is unknown"
    return (
        f"poolwatch: the {probe} probe is off: {found}, the probe supports {library}{spec} "
        f"only; the app runs unchanged, without its metrics. Use {library}{spec} to turn it on."
    )
