"""Connection leak detection (``POOLWATCH_LEAK_THRESHOLD``), one implementation for every pool.

Both pool probes record each checkout in ``PoolStats.held`` (checkout key -> checkout time).
With leak detection off that is a plain dict and nothing here runs: the probes' hot path is
exactly the same code. With it on, ``held`` is a :class:`HeldConnections`, a dict that also
notes who took each connection (route, task, stack), and a checker thread scans every pool's
``held`` a few times per threshold: a connection older than the threshold is counted in
``poolwatch_connection_leaks_total`` and logged once; its return is logged once ("unleaked").
"""

from __future__ import annotations

import asyncio
import linecache
import os
import sys
import threading
from time import perf_counter
from types import CodeType
from typing import Any, NamedTuple, Protocol

from .._log import errors, logger
from .._types import Hooks, Host, Stop
from ..context import current_route

PROBE = "leaks"
MAX_FRAMES = 32  # innermost frames kept: the handler is rarely deeper (the rest is framework)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # poolwatch/


class Pool(Protocol):
    """A pool's stats (``_pool_stats.PoolStats``) as leak detection uses them."""

    name: str

    def leaked(self) -> None: ...


class Checkout(NamedTuple):
    """Who took a connection: captured at checkout, only while leak detection is on. Kept raw
    (objects, code offsets) and formatted only when a leak is reported."""

    route: str | None
    taker: asyncio.Task[Any] | threading.Thread | None
    codes: list[CodeType]  # the stack, innermost first...
    offsets: list[int]  # ...and each frame's f_lasti (parallel lists: no tuple per frame)


class Leak(NamedTuple):
    started: float  # checkout time (perf_counter), as in ``held``
    checkout: Checkout | None


def _checkout() -> Checkout | None:
    # Runs on every checkout while leak detection is on: hand-written and inlined for cost
    # (bench/bench_leaks.py). traceback.extract_stack() would read line numbers and source
    # now; code objects and instruction offsets are several times cheaper, allocate no object
    # per frame for the garbage collector to track, and keep no frame (nor its locals) alive.
    try:
        try:
            taker: Any = asyncio.current_task()
        except RuntimeError:  # no running loop: a sync engine used from a thread
            taker = None
        if taker is None:
            taker = threading.current_thread()
        codes: list[CodeType] = []
        offsets: list[int] = []
        frame: Any = sys._getframe(2)  # the probe's wrapper (this and __setitem__ skipped)
        greenlet_module = sys.modules.get("greenlet")
        glet = greenlet_module.getcurrent() if greenlet_module is not None else None
        while frame is not None and len(codes) < MAX_FRAMES:
            codes.append(frame.f_code)
            offsets.append(frame.f_lasti)
            frame = frame.f_back
            if frame is None and glet is not None:
                # SQLAlchemy's asyncio layer checks out in a child greenlet whose stack ends
                # there; the handler awaiting it is in the parent greenlet's stack.
                glet = glet.parent
                frame = glet.gr_frame if glet is not None else None
        return Checkout(current_route(), taker, codes, offsets)
    except Exception as exc:  # never break a checkout for a log hint
        errors.record(PROBE, exc)
        return None


def _describe(taker: Any) -> str | None:
    if isinstance(taker, threading.Thread):
        return f"thread {taker.name}"
    if isinstance(taker, asyncio.Task):
        return f"{taker.get_name()} ({getattr(taker.get_coro(), '__qualname__', '?')})"
    return None


def _line(code: CodeType, lasti: int) -> int | None:
    for start, end, line in code.co_lines():
        if start <= lasti < end:
            return line
    return None


class HeldConnections(dict[int, float]):
    """``PoolStats.held`` while leak detection is on: also remembers who took each connection,
    and logs "unleaked" when a connection reported as leaked comes back."""

    __slots__ = ("reported", "stats", "takers")

    def __init__(self, stats: Pool) -> None:
        super().__init__()
        self.stats = stats
        self.takers: dict[int, Checkout | None] = {}
        self.reported: dict[int, Leak] = {}  # keys logged as leaked and not returned yet

    def __setitem__(self, key: int, started: float) -> None:
        self.takers[key] = _checkout()  # before the key shows up as held
        dict.__setitem__(self, key, started)

    def pop(self, key: int, *default: Any) -> Any:
        started = dict.pop(self, key, *default)
        self.takers.pop(key, None)
        if self.reported:
            leak = self.reported.pop(key, None)
            if leak is not None and leak.started == started:
                _log_unleaked(self.stats, leak)
        return started


def enabled(agent: Host) -> bool:
    """Whether pools watched from now on track who holds their connections."""
    return bool(agent.settings and agent.settings.leak_threshold)


def _format(checkout: Checkout) -> str:
    lines = [f"Stack at checkout (innermost {MAX_FRAMES} frames, most recent call last):"]
    for code, lasti in reversed(list(zip(checkout.codes, checkout.offsets, strict=True))):
        if code.co_filename.startswith(_OWN_DIR):
            continue
        lineno = _line(code, lasti)
        lines.append(f'  File "{code.co_filename}", line {lineno}, in {code.co_name}')
        source = linecache.getline(code.co_filename, lineno).strip() if lineno else ""
        if source:
            lines.append(f"    {source}")
    return "\n".join(lines)


def _log_unleaked(stats: Pool, leak: Leak) -> None:
    checkout = leak.checkout
    logger.info(
        "connection unleaked: returned to the pool after a leak warning",
        pool=stats.name,
        held_seconds=round(perf_counter() - leak.started, 3),
        route=checkout.route if checkout else None,
        task=_describe(checkout.taker) if checkout else None,
    )


class LeakChecker:
    """Scans every pool's ``held`` from a daemon thread; never touches the event loop."""

    def __init__(self, agent: Host, threshold: float) -> None:
        self.agent = agent
        self.threshold = threshold
        # A leak is reported at most a quarter threshold (and 1 s) late; scans are cheap (one
        # dict copy per pool, a handful of entries each).
        self.interval = min(max(threshold / 4, 0.02), 1.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poolwatch-leaks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception as exc:
                errors.record(PROBE, exc)

    def scan(self) -> None:
        for source in self.agent.registry.sources():
            held = getattr(source, "held", None)
            if isinstance(held, HeldConnections) and not getattr(source, "closed", False):
                self._scan_pool(source, held)

    def _scan_pool(self, stats: Any, held: HeldConnections) -> None:
        now = perf_counter()
        for key, started in _snapshot(held).items():
            if now - started <= self.threshold:
                continue
            known = held.reported.get(key)
            if known is not None and known.started == started:
                continue  # already reported
            leak = Leak(started, held.takers.get(key))
            held.reported[key] = leak
            stats.leaked()
            checkout = leak.checkout
            logger.warning(
                "connection leak suspected: held longer than POOLWATCH_LEAK_THRESHOLD",
                pool=stats.name,
                held_seconds=round(now - started, 3),
                threshold_seconds=self.threshold,
                route=checkout.route if checkout else None,
                task=_describe(checkout.taker) if checkout else None,
                stack=_format(checkout) if checkout else None,
            )
            if held.get(key) != started and held.reported.pop(key, None) is leak:
                _log_unleaked(stats, leak)  # returned while we were reporting it


def _snapshot(held: dict[int, float]) -> dict[int, float]:
    # Other threads may write while we copy: dict.copy is one C call, retry if it raced.
    for _ in range(5):
        try:
            return dict.copy(held)
        except RuntimeError:
            continue
    return {}


# --- the probe contract (probes/__init__.py) ------------------------------------------------
WATCHES = None  # the pools are the pool probes' (PoolStats(track_leaks=enabled(agent)))


def install(agent: Host, hooks: Hooks) -> None:
    return None  # no hooks of its own: the pool probes record who holds each connection


def existing(agent: Host, obj: Any) -> None:
    return None


def watch(agent: Host, obj: Any, name: str | None = None) -> None:
    raise TypeError("the leaks probe watches no objects: POOLWATCH_LEAK_THRESHOLD turns it on")


def start(agent: Host) -> Stop | None:
    threshold = agent.settings.leak_threshold if agent.settings else None
    if not threshold:
        return None
    checker = LeakChecker(agent, threshold)
    checker.start()
    return checker.stop
