"""Issue 11: cardinality attacks stay under the documented caps.

10 000 random paths (route templates, one `_UNMATCHED` label), 1 000 distinct upstream hosts
(`POOLWATCH_HTTP_CLIENT_MAX_HOSTS`, rest `other`), 1 000 distinct blocking functions
(`POOLWATCH_MAX_CULPRITS`, rest `other`).
"""

from __future__ import annotations

import asyncio
import importlib
import random
import string
import sys
import time

import aiohttp
import pytest

import poolwatch
from poolwatch.testing import snapshot
from tests.support.net import free_port, scrape
from tests.test_http_server import APP, requests, series

SPECIAL_CULPRITS = {"other", "unknown", "cpu-starved", "gil-starved"}


async def test_10000_random_paths_add_no_series(app_server):
    server = app_server(APP)
    await requests(server.url, ["/users/1", "/no-such-page"])
    before = series(server.scrape())
    alphabet = string.ascii_letters + string.digits + "-_.%"
    rng = random.Random(11)
    scan = ["/" + "".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(10_000)]
    statuses = await requests(server.url, scan, parallel=32)
    assert set(statuses) <= {404, 400}
    samples = server.scrape()
    assert series(samples) == before
    assert not any(path in samples.text for path in scan[:200])


async def test_1000_upstream_hosts_stay_under_the_host_cap(agent):
    ports = sorted({free_port() for _ in range(1000)})  # closed: every connection is refused
    async with aiohttp.ClientSession() as session:
        for port in ports:
            with pytest.raises(aiohttp.ClientConnectorError):  # the app's own error, unchanged
                async with session.get(f"http://127.0.0.1:{port}/x?token=t0k-{port}"):
                    pass
    samples = scrape(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    text = samples.text
    labelled = [s for s in samples.samples if "server_port" in s.labels]
    hosts = {(s.labels["server_address"], s.labels["server_port"]) for s in labelled}
    assert len(hosts) <= 50 + 1, len(hosts)  # the default cap, plus `other`
    assert ("other", "") in hosts
    assert "t0k-" not in text and "/x" not in text


def test_1000_blocking_functions_stay_under_the_culprit_cap(clean_agent, tmp_path, monkeypatch):
    monkeypatch.setenv("POOLWATCH_LOOP_INTERVAL", "0.002")
    monkeypatch.setenv("POOLWATCH_BLOCK_THRESHOLD", "0.01")
    source = "import time\n" + "".join(
        f"def blocker_{i}():\n    time.sleep(0.025)\n" for i in range(1000)
    )
    (tmp_path / "many_blockers.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("many_blockers")

    culprits: dict[str, float] = {}

    async def main() -> None:
        stop = poolwatch.watch_event_loop()
        for i in range(1000):
            getattr(module, f"blocker_{i}")()
            await asyncio.sleep(0.004)  # let the watchdog see the end of the block
        await asyncio.sleep(0.1)
        for sample in snapshot().find("asyncio_event_loop_blocks_total"):
            culprits[sample.labels["culprit"]] = sample.value
        stop()

    try:
        started = time.monotonic()
        asyncio.run(main())
    finally:
        sys.modules.pop("many_blockers", None)
    named = set(culprits) - SPECIAL_CULPRITS
    assert len(named) <= 20, len(named)  # POOLWATCH_MAX_CULPRITS default
    assert all(name.startswith("many_blockers:blocker_") for name in named)
    assert culprits.get("other", 0) >= 900, (culprits.get("other"), time.monotonic() - started)
