"""Helpers of the event-loop tests (test_loop.py, test_loop_culprits.py): a coroutine run
under uvloop or asyncio, a metric read in-process, a value polled until it is right."""

from __future__ import annotations

import asyncio
import time

from poolwatch.testing import snapshot

LOOPS = ["uvloop", "asyncio"]


def wait_for(read, ok, timeout: float = 5.0):
    """``read()`` until ``ok`` of its value, for ``timeout`` s at most: the last value read (it
    does not fail, unlike net.wait_for: the test's assertion says what was wrong)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def run(loop_name: str, main) -> None:
    """``main()`` to its end on a new loop of ``loop_name`` (uvloop or asyncio)."""
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def points(metric) -> dict:
    """{label values: value} of one metric now, read with poolwatch.testing (a histogram: its
    count)."""
    sample = metric.prom_name + {"counter": "_total", "histogram": "_count"}.get(metric.kind, "")
    return {tuple(s.labels.values()): s.value for s in snapshot().find(sample)}
