"""Cost of the start-up search for pools made before ``instrument()``, on a large heap.

    python -m bench.bench_heap_walk [--objects 1000000] [--rounds 7]

The agent searches the heap once per process (one pass for every probe, exact-type set lookup);
before, every ``instrument()`` call made one ``isinstance`` pass per probe. Both are measured
side by side on the same heap (interleaved rounds, medians), and what an app that calls
``instrument()`` 20 times (an app built per test) pays with each.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import poolwatch
from bench.common import interleave
from poolwatch.agent import agent


class Node:
    __slots__ = ("next",)  # a small object the garbage collector tracks, as most app objects

    def __init__(self, next: object = None) -> None:
        self.next = next


def per_probe_isinstance_walks() -> None:
    """What each instrument() did before: one isinstance pass per probe."""
    import aiohttp
    from asyncpg.pool import Pool
    from sqlalchemy.engine import Engine

    for cls in (Engine, Pool, aiohttp.ClientSession):
        [obj for obj in gc.get_objects() if isinstance(obj, cls)]


async def main(objects: int, rounds: int) -> None:
    heap = [Node() for _ in range(objects)]
    poolwatch.instrument(metrics_port=0)
    tracked = len(gc.get_objects())

    def timed(walk):
        async def run() -> float:
            start = time.perf_counter()
            walk()
            return time.perf_counter() - start

        return (lambda: None, run)

    medians = await interleave(
        {
            "one pass, all probes": timed(agent._watch_existing),
            "isinstance pass per probe": timed(per_probe_isinstance_walks),
        },
        rounds,
    )
    poolwatch.uninstrument()
    one, old = medians["one pass, all probes"], medians["isinstance pass per probe"]
    print(f"\nheap: {tracked:,} objects tracked by the garbage collector")
    print(f"{'variant':<28}{'ms per walk':>12}{'ms per 1e6 objects':>20}")
    for name, seconds in medians.items():
        print(f"{name:<28}{seconds * 1e3:>12.1f}{seconds * 1e9 / tracked:>20.1f}")
    print(f"ratio old/new per instrument(): {old / one:.1f}")
    print(f"20 instrument() calls: now {one * 1e3:.0f} ms (one walk), before {old * 20:.2f} s")
    del heap


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.objects, args.rounds))
