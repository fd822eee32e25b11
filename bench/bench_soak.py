"""The agent's own CPU share on the demo app under the soak load (issue 11).

    python -m bench.bench_soak [--seconds 20] [--rounds 3]

Interleaved rounds of the same bounded load (tests/support/soak.py) against the demo app served
bare and with every poolwatch probe on, each in its own uvicorn process; the process CPU time per
request is compared: share = (instrumented - bare) / instrumented.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile

from tests.support.apps import start_app
from tests.support.soak import soak, start_upstream


async def main(seconds: float, rounds: int) -> None:
    runner, upstream = await start_upstream()
    per_request: dict[str, list[float]] = {"bare": [], "poolwatch": []}
    try:
        for _ in range(rounds):
            for variant in per_request:
                env = {
                    "DEMO_DATABASE_URL": f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/b.db",
                    "DEMO_UPSTREAM_URL": upstream,
                    "TEST_APP_BARE": "1" if variant == "bare" else "0",
                }
                server = start_app("tests.apps.demo_app:app", env, metrics=variant != "bare")
                if variant == "bare":
                    server.metrics_port = 0  # nothing to scrape
                try:
                    result = await soak(server, seconds, sample_every=seconds)
                finally:
                    server.stop()
                per_request[variant].append(result.cpu / result.requests)
    finally:
        await runner.cleanup()
    bare = statistics.median(per_request["bare"])
    instrumented = statistics.median(per_request["poolwatch"])
    print(f"CPU per request, median of {rounds} interleaved rounds of {seconds:.0f} s:")
    print(f"  bare      {bare * 1e3:.3f} ms")
    print(f"  poolwatch {instrumented * 1e3:.3f} ms")
    print(f"  agent's share of the app's CPU: {(instrumented - bare) / instrumented:.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds))
