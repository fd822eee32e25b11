"""Event loop: lag, blocks, and the code that blocked it.

A timer callback (the *tick*), re-armed every ``POOLWATCH_LOOP_INTERVAL``, measures how late the
loop runs it: the lag. A watchdog thread notices when the pending tick is overdue by
``POOLWATCH_BLOCK_THRESHOLD``, samples the loop thread's stack (``sys._current_frames()``) while
the block is still on, and once the tick finally runs it counts the block under the innermost
application frame (the culprit rule, ``_culprit.py``) and logs one warning. The app's own path
pays one timer callback per interval; the sampling, counting and logging happen on the
watchdog's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from time import perf_counter
from types import FrameType
from typing import Any, NamedTuple

from .._histogram import FOLD_AT, Histogram
from .._log import errors, logger
from .._types import Hooks, Host, Sources, Stop
from ..config import Settings, load_settings
from ..metrics import LOOP_BLOCKED, LOOP_BLOCKS, LOOP_LAG, LOOP_TASKS, Point
from ._culprit import Sample, app_packages, sample_stack

PROBE = "loop"
OTHER = "other"  # culprits beyond POOLWATCH_MAX_CULPRITS; exported at 0 from the start
UNKNOWN = "unknown"  # the block ended before the watchdog could sample the stack
CPU_STARVED = "cpu-starved"  # the loop's thread was runnable but got no CPU (limits, busy node)
GIL_STARVED = "gil-starved"  # the loop's thread waited for the GIL other threads held
MACHINE = (UNKNOWN, CPU_STARVED, GIL_STARVED)  # labels that name no code: never capped
TASKS_EVERY = 1.0  # seconds between asyncio_tasks samples: all_tasks() is O(tasks)

# asyncio's dispatch between the frame running the loop and a callback (uvloop's is C code)
_DISPATCH = (
    asyncio.events.Handle._run.__code__,
    asyncio.base_events.BaseEventLoop._run_once.__code__,  # type: ignore[attr-defined]
)


class Cpu(NamedTuple):
    ran: float  # the loop thread's seconds on a CPU
    waited: float  # ...runnable, waiting for a CPU
    slices: int  # ...times put on a CPU
    process: float  # the process's CPU seconds, all threads


class LoopWatch:
    """Lag probe, watchdog thread and the metric source of one event loop."""

    probe = PROBE

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        app_packages: frozenset[str],
        registry: Sources,
    ) -> None:
        self.loop = loop
        self.interval = settings.loop_interval
        self.threshold = settings.block_threshold
        self.max_culprits = settings.max_culprits
        self.app_packages = app_packages
        self.registry = registry
        self.lag = Histogram()
        # written by the watchdog thread only; the labels that name no code exist at 0 from the
        # start, so rate() sees 0 rather than nothing and the series count stays flat
        self.blocks: dict[str, int] = dict.fromkeys((OTHER, *MACHINE), 0)
        self.blocked_seconds = 0.0
        self.tasks = 0
        self.stopped = False
        self._named = 0  # distinct culprit labels given so far
        self._thread_id: int | None = None  # the loop's thread, learnt by the first tick
        self._native_id: int | None = None
        self.runner: tuple[int, object] = (0, None)  # (id, code) of the frame running the loop
        self._schedstat: int | None = None  # fd of the loop thread's /proc schedstat (Linux)
        self._cpu_ref: Cpu | None = None  # its CPU accounting, last seen healthy
        self._due = float("inf")  # perf_counter() when the pending tick should run
        self._handle: asyncio.TimerHandle | None = None
        # Bound once: the tick re-arms itself 100 times a second. Its own empty context spares
        # the loop a copy_context() per tick, and keeps the app's context vars out of it.
        self._call_later = loop.call_later
        self._tick_callback = self._tick
        self._context = contextvars.Context()
        self._next_tasks = 0.0
        self._ended: deque[tuple[float, float]] = deque()  # (due, lag) of ticks >= threshold late
        self._sample: Sample | None = None
        self._stalled = 0.0  # the due time of the tick the watchdog last found overdue
        # The watchdog's doorbell: held while nobody rings, so acquire(timeout) is its sleep.
        # A bare lock, not an Event: Event.wait builds a Condition waiter on every sleep.
        self._bell = threading.Lock()
        self._bell.acquire()
        self._watchdog = threading.Thread(
            target=self._watch, name="poolwatch-loop-watchdog", daemon=True
        )

    def start(self) -> None:
        self.registry.add(self)
        self.loop.call_soon_threadsafe(self._first_tick)  # works from any thread
        self._watchdog.start()

    def stop(self) -> None:
        global _current
        if self.stopped:
            return
        self.stopped = True  # the tick does not re-arm; the watchdog exits
        self.registry.remove(self)
        with _current_lock:
            if _current is self:
                _current = None
        handle = self._handle
        try:
            if handle is not None:
                if threading.get_ident() == self._thread_id:
                    handle.cancel()
                elif not self.loop.is_closed():
                    self.loop.call_soon_threadsafe(handle.cancel)  # TimerHandle isn't thread-safe
        except RuntimeError:  # the loop closed meanwhile: the handle will never run anyway
            pass
        self._ring()
        if self._watchdog.is_alive() and threading.current_thread() is not self._watchdog:
            self._watchdog.join(timeout=2)

    # --- on the loop's thread: the tick -----------------------------------------------------
    def _first_tick(self) -> None:
        runner: FrameType | None = sys._getframe(1)  # asyncio's dispatch; under uvloop, C
        while runner is not None and runner.f_code in _DISPATCH:
            runner = runner.f_back
        if runner is not None:  # kept as (id, code): a frame reference would hold its locals
            self.runner = (id(runner), runner.f_code)
        self._native_id = threading.get_native_id()
        self._thread_id = threading.get_ident()
        self._arm(perf_counter())

    def _arm(self, now: float) -> None:
        if self.stopped:
            return
        try:
            self._due = now + self.interval
            self._handle = self._call_later(
                self.interval, self._tick_callback, context=self._context
            )
        except Exception as exc:  # e.g. the loop is closing
            errors.record(PROBE, exc)

    def _tick(self) -> None:
        # The app pays this 100 times a second: one clock read, one deque.append (Histogram's
        # observe, inlined), two comparisons, and the re-arm; everything else is the watchdog's.
        now = perf_counter()
        try:
            lag = now - self._due
            if lag < 0.0:  # uvloop's ms timers may fire up to 1 ms early
                lag = 0.0
            new = self.lag.new
            new.append(lag)
            if len(new) >= FOLD_AT:
                self.lag.fold()
            if lag >= self.threshold:
                self._ended.append((self._due, lag))
                self._ring()
            if now >= self._next_tasks:
                self._next_tasks = now + TASKS_EVERY
                # Only on the loop's own thread: all_tasks() iterates a WeakSet the loop mutates
                # as tasks start and finish, so from another thread it can fail or miscount.
                self.tasks = len(asyncio.all_tasks(self.loop))
                now = perf_counter()  # all_tasks() is O(tasks): the next due starts after it
        except Exception as exc:
            errors.record(PROBE, exc)
        self._arm(now)  # no fresh clock read otherwise: the work above is sub-microsecond

    def _ring(self) -> None:
        """Wake the watchdog now (a block just ended, or stop)."""
        with contextlib.suppress(RuntimeError):  # rung already, not yet heard
            self._bell.release()

    # --- on the watchdog's thread -----------------------------------------------------------
    def _watch(self) -> None:
        while not self.stopped:
            due = self._due
            if due == self._stalled:  # a block in progress: look again until it ends
                timeout = self.threshold / 4
            else:
                # Sleep until the pending tick would be overdue by the threshold: a healthy loop
                # wakes us about once per threshold (each wake-up costs the loop a GIL
                # hand-off), and a block is caught the moment it becomes one.
                timeout = min(max(due + self.threshold - perf_counter(), 0.0), self.threshold)
            target = perf_counter() + timeout
            self._bell.acquire(timeout=timeout)  # returns early when rung; then it is held again
            now = perf_counter()
            try:
                if self.loop.is_closed():  # the app's loop ended without stopping us
                    self.stop()
                    break
                while self._ended:  # before _check: it moves the schedstat reference on
                    self._record(*self._ended.popleft())
                self._check(now, late=now - target)
            except Exception as exc:
                errors.record(PROBE, exc)
        if self._schedstat is not None:
            os.close(self._schedstat)

    def _check(self, now: float, late: float) -> None:
        """Sample the loop thread's stack once per overdue tick."""
        due, thread_id = self._due, self._thread_id
        if thread_id is None:
            return
        if now - due < self.threshold:
            self._cpu_ref = self._schedstat_now()  # the loop is healthy: a fresh reference
            return
        self._stalled = due
        if self._sample is not None and self._sample.due == due:
            return
        if late > self.threshold / 2:
            # We could not run for a while: C code held the GIL, so the block may already be
            # over and the loop's stack belong to some later callback. Only sample a live block.
            return
        if not self.loop.is_running():
            return
        frame = sys._current_frames().get(thread_id)
        if frame is not None and self._due == due:
            self._sample = sample_stack(frame, due, self.app_packages, self.runner)

    def _schedstat_now(self) -> Cpu | None:
        """The loop thread's Linux schedstat (seconds on a CPU, seconds runnable but waiting for
        one, times put on a CPU) and the process's CPU time; None elsewhere. A thread blocked
        in a call (sleep, recv) neither runs nor waits, and is put on a CPU once when it ends."""
        try:
            if self._schedstat is None and self._native_id is not None:
                path = f"/proc/self/task/{self._native_id}/schedstat"
                self._schedstat = os.open(path, os.O_RDONLY)
            if self._schedstat is not None:
                ran, waited, slices = os.pread(self._schedstat, 128, 0).split()[:3]
                return Cpu(int(ran) / 1e9, int(waited) / 1e9, int(slices), time.process_time())
        except (OSError, ValueError):
            self._native_id = None  # not Linux, or no schedstat: stop trying
        return None

    def _starved(self, lag: float, details: dict[str, object]) -> str | None:
        """Was the stall the machine's or other threads' doing rather than the loop's code?

        ``cpu-starved``: the loop's thread spent a quarter of the stall or more waiting for a CPU,
        and longer than it ran (CPU limits, a busy node).
        ``gil-starved``: it neither ran nor waited for a CPU for most of the stall, yet was put
        on a CPU again and again (a thread waiting for the GIL wakes every switch interval; one
        blocked in a call sleeps through), while the process's other threads burned CPU: the
        threadpool (sync routes, ``run_in_threadpool``) held the GIL.
        """
        now, before = self._schedstat_now(), self._cpu_ref
        if now is None or before is None:
            return None
        ran, waited = now.ran - before.ran, now.waited - before.waited
        others = (now.process - before.process) - ran
        details["ran_s"], details["waited_for_cpu_s"] = round(ran, 3), round(waited, 3)
        if waited >= lag / 4 and waited > ran:
            return CPU_STARVED
        wakeups = now.slices - before.slices
        expected = lag / sys.getswitchinterval()
        # measured here: a GIL waiter is put on a CPU about once per switch interval, or more;
        # a thread blocked in a call 3 to 15 times in 60 intervals, from GIL waits at its ends
        if ran + waited < lag / 2 and others >= lag / 2 and wakeups >= max(3, expected / 2):
            details["other_threads_cpu_s"] = round(others, 3)
            return GIL_STARVED
        return None

    def _record(self, due: float, lag: float) -> None:
        sample = self._sample if self._sample is not None and self._sample.due == due else None
        # The block began at an unknown point of the interval before the late tick was due:
        # adding half an interval keeps the error within +- interval/2 (lag alone under-reports).
        seconds = lag + self.interval / 2
        culprit = sample.culprit if sample and sample.culprit else UNKNOWN
        details: dict[str, object] = {}
        starved = self._starved(lag, details)
        if starved is not None:
            culprit = starved
            if starved == GIL_STARVED:
                details["hint"] = (
                    "the loop's thread waited for the GIL while other threads of the process "
                    "ran Python code (the threadpool: sync routes, run_in_threadpool)"
                )
        if sample and sample.culprit is None:
            details["idle"] = True  # sampled in its own machinery: the machine stalled, not code
        label = self._label(culprit)
        self.blocks[label] = self.blocks.get(label, 0) + 1
        self.blocked_seconds += seconds
        if sample and sample.route:
            details["route"] = sample.route
        if sample and sample.stack:
            details["frames"] = " <- ".join(sample.stack)  # structlog reserves "stack"
        logger.warning(
            "event loop blocked", duration_s=round(seconds, 3), culprit=culprit, **details
        )

    def _label(self, culprit: str) -> str:
        if culprit in self.blocks:
            return culprit
        if culprit in MACHINE or self._named < self.max_culprits:
            self._named += culprit not in MACHINE
            return culprit
        return OTHER

    # --- the registry source (read at collect time on the exporter's thread) ----------------
    def alive(self) -> bool:
        return not self.stopped

    def points(self) -> Iterator[Point]:
        yield Point(LOOP_LAG, {}, self.lag.value())
        for culprit, count in list(self.blocks.items()):
            yield Point(LOOP_BLOCKS, {"culprit": culprit}, count)
        yield Point(LOOP_BLOCKED, {}, self.blocked_seconds)
        yield Point(LOOP_TASKS, {}, self.tasks)


# One watched loop per process: the metrics carry no loop label.
_current: LoopWatch | None = None
_current_lock = threading.Lock()


# --- the probe contract (probes/__init__.py) ------------------------------------------------
WATCHES = None  # a loop is watched when the agent starts in it, or by watch_event_loop()


def install(agent: Host, hooks: Hooks) -> None:
    """No class-level hooks (everything starts with the loop); uninstrument() stops the watcher."""
    hooks.on_undo(_stop_current)


def _stop_current() -> None:
    if (watcher := _current) is not None:
        watcher.stop()


def existing(agent: Host, obj: Any) -> None:
    return None


def start(agent: Host) -> Stop | None:
    """Watch the loop the agent starts in (the app's, at lifespan start-up)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # agent.start() called from sync code: there is no loop to watch
        return None
    return watch(agent, loop)


def watch(agent: Host, loop: asyncio.AbstractEventLoop, name: str | None = None) -> Stop:
    """Start watching ``loop`` (a loop watched already keeps its watcher); returns stop."""
    global _current
    settings = agent.settings or load_settings()
    packages = app_packages(agent.app_module)
    with _current_lock:
        previous = _current
        if previous is not None and previous.loop is loop and not previous.stopped:
            return previous.stop
        watcher = _current = LoopWatch(loop, settings, packages, agent.registry)
    if previous is not None:
        previous.stop()
    watcher.start()
    return watcher.stop


def watching() -> LoopWatch | None:
    """The loop watcher of this process, if one runs."""
    return _current
