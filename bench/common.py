"""Side-by-side measurement: interleaved rounds of each variant, medians, ratios."""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable


async def interleave(
    variants: dict[str, tuple[Callable[[], None], Callable[[], Awaitable[float]]]],
    rounds: int,
) -> dict[str, float]:
    """``variants``: name -> (set-up switching to it, one timed round returning seconds/op).

    Rounds alternate between variants so drift (CPU frequency, cache, the database) hits all.
    Returns the median seconds per operation of each variant.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (switch, run) in variants.items():
            switch()
            times[name].append(await run())
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, medians: dict[str, float], baseline: str, unit: float = 1e6) -> None:
    base = medians[baseline]
    print(f"\n{title}")
    print(f"{'variant':<28}{'median µs/op':>14}{'added µs':>10}{'ratio':>8}")
    for name, value in medians.items():
        print(f"{name:<28}{value * unit:>14.2f}{(value - base) * unit:>10.2f}{value / base:>8.3f}")
