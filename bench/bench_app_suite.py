"""What the one-liner costs an app's own test suite: the shop's suite, bare vs instrumented.

    python -m bench.bench_app_suite [--rounds 3] [--workers 2]

The shop (tests/apps/shop) builds a fresh app per test and drives it with LifespanManager and
httpx under pytest-xdist, like users' suites. Its suite is run unchanged in a subprocess, bare
and with ``SHOP_POOLWATCH=1`` (``instrument(app)`` in its app factory), alternately, against one
PostgreSQL started here; wall time and the CPU time of pytest and its workers (children's
rusage) are compared by their medians. Goal: instrumented/bare CPU within 1.15x, same passes.
``--workers 0`` runs the suite in one process (no xdist): every lifespan then gets the metrics
port, where two workers mostly find it taken by each other.
"""

from __future__ import annotations

import argparse
import statistics

from tests.support.postgres import remove, start_postgres
from tests.support.shop_suite import SuiteRun, run_shop_suite

GOAL = 1.15


def main(rounds: int, workers: int) -> None:
    pg = start_postgres()
    runs: dict[str, list[SuiteRun]] = {"bare": [], "poolwatch": []}
    try:
        for n in range(rounds):
            for variant, results in runs.items():
                run = run_shop_suite(
                    pg.dsn(), poolwatch=variant == "poolwatch", args=("-n", str(workers))
                )
                results.append(run)
                print(
                    f"round {n + 1} {variant:<10} wall {run.wall:6.2f} s  cpu {run.cpu:6.2f} s  "
                    f"passed {run.passed}  failed+errors {run.failures}",
                    flush=True,
                )
    finally:
        remove(pg)
    wall = {v: statistics.median(r.wall for r in results) for v, results in runs.items()}
    cpu = {v: statistics.median(r.cpu for r in results) for v, results in runs.items()}
    print(f"\nshop suite, pytest -n {workers}, median of {rounds} interleaved rounds")
    print(f"{'variant':<12}{'wall s':>9}{'cpu s':>9}{'passed':>9}")
    for variant, results in runs.items():
        passed = "/".join(str(r.passed) for r in results)
        print(f"{variant:<12}{wall[variant]:>9.2f}{cpu[variant]:>9.2f}{passed:>9}")
    cpu_ratio = cpu["poolwatch"] / cpu["bare"]
    verdict = "within" if cpu_ratio <= GOAL else "OVER"
    print(f"instrumented/bare wall {wall['poolwatch'] / wall['bare']:.3f}")
    print(f"instrumented/bare CPU  {cpu_ratio:.3f}  ({verdict} the {GOAL}x goal)")
    same = {r.passed for results in runs.values() for r in results}
    print("pass counts: " + ("all equal" if len(same) == 1 else f"DIFFER {sorted(same)}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    main(args.rounds, args.workers)
