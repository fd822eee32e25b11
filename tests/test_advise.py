"""Issue 10: `poolwatch advise` on recorded scenarios (exposition text written by poolwatch's own
exporter with known traffic), and end to end against a live app, via /metrics and Prometheus."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from poolwatch._registry import Registry
from poolwatch.cli.advise import Budget, fleet_lines, from_snapshots, recommend, report
from poolwatch.cli.scrape import parse
from poolwatch.exporters.prometheus import PoolwatchCollector
from poolwatch.probes._pool_stats import PoolGauges, PoolStats
from tests.support import planted
from tests.support.net import free_port, get, wait_for_port
from tests.support.postgres import PASSWORD

APP = "tests.apps.pool_app:app"


class RecordedPool:
    """A pool whose traffic the test dictates, exposed through the real exporter."""

    def __init__(self, name: str, pool_size: int, max_overflow: int) -> None:
        self.gauges = PoolGauges(
            used=0, idle=pool_size, idle_max=pool_size, idle_min=0,
            max=pool_size + max_overflow, overflow=0,
        )  # fmt: skip
        self.stats = PoolStats("sqlalchemy", name, lambda: self.gauges, invalidations=True)
        self.registry = Registry()
        self.registry.add(self.stats)

    def traffic(self, checkouts: int, hold: float, timeouts: int = 0) -> None:
        for _ in range(checkouts):
            self.stats.wait_time.observe(0.0005)
            self.stats.use_time.observe(hold)
        for _ in range(timeouts):
            self.stats.timed_out()

    def snapshot(self, used: int = 0, pending: int = 0):
        self.gauges = self.gauges._replace(used=used, idle=max(self.gauges.idle_max - used, 0))
        self.stats.waiting = {i: 0.0 for i in range(pending)}
        collector = CollectorRegistry(auto_describe=False)
        collector.register(PoolwatchCollector(self.registry.collect))
        return parse(generate_latest(collector).decode())


def record(pool: RecordedPool, seconds: float, rate: float, hold: float, peak: int = 0, **kw):
    """A window of ``seconds`` at ``rate`` checkouts/s each held ``hold`` s; ``peak`` used once."""
    first = pool.snapshot()
    pool.traffic(round(rate * seconds / 2), hold)
    middle = pool.snapshot(used=peak, pending=kw.pop("pending", 0))
    pool.traffic(round(rate * seconds / 2), hold, **kw)
    last = pool.snapshot()
    [observation] = from_snapshots(first, last, [first, middle, last], seconds)
    return observation


def test_known_rate_and_hold_give_the_formulas_size():
    obs = record(RecordedPool("orders", 5, 10), seconds=60, rate=50, hold=0.2, peak=12)
    assert obs.rate == pytest.approx(50)
    assert obs.hold_mean == pytest.approx(0.2)
    assert obs.peak_used == 12 and obs.timeouts == 0
    advice = recommend(obs)
    assert advice.pool_size == math.ceil(50 * 0.2 * 1.5) == 15  # Little's law x 1.5
    assert advice.total >= math.ceil(12 * 1.5)  # room for the peak seen, with the headroom
    text = "\n".join(report([obs], "recorded"))
    assert "50.0 checkouts/s" in text and "mean 200 ms" in text and "peak used 12" in text
    assert f"pool_size=15 max_overflow={advice.max_overflow}" in text
    assert "50.0/s x 200 ms mean hold = 10.0 busy x 1.5 -> pool_size 15" in text
    assert "now pool_size=5 max_overflow=10" in text


def test_a_quiet_pool_is_advised_smaller_and_an_idle_one_not_at_all():
    obs = record(RecordedPool("quiet", 20, 10), seconds=60, rate=2, hold=0.05, peak=1)
    advice = recommend(obs)
    assert advice.pool_size == math.ceil(2 * 0.05 * 1.5) == 1
    assert advice.total < 30
    idle = record(RecordedPool("idle", 5, 5), seconds=60, rate=0, hold=0.05)
    assert recommend(idle) is None
    assert "nothing: no checkouts in the window" in "\n".join(report([idle], "recorded"))


def test_a_pool_that_timed_out_is_advised_more_than_its_max():
    # max 6 (4 + 2), saturated: 6 used and 9 waiting at the peak, 30 checkouts timed out.
    obs = record(
        RecordedPool("dry", 4, 2), seconds=60, rate=20, hold=0.05, peak=6, pending=9, timeouts=30
    )
    assert obs.timeouts == 30 and obs.peak_demand == 15
    advice = recommend(obs)
    assert advice.total > 6
    assert advice.total >= math.ceil(15 * 1.5)  # everyone who wanted one at the peak, x 1.5
    # Even when no sample caught the queue, timeouts alone mean demand exceeded max.
    blind = record(RecordedPool("dry2", 4, 2), seconds=60, rate=20, hold=0.05, timeouts=30)
    assert blind.peak_demand == 0
    assert recommend(blind).total >= math.ceil((6 + 1) * 1.5) > 6
    assert "30 timeouts: demand exceeded max 6" in recommend(blind).reasoning


def test_fleet_over_budget_says_so_and_what_fits():
    over = fleet_lines(Budget(100, 3, 40, "10 replicas x 4 workers"), 15, 19)
    text = "\n".join(over)
    assert "100 - 3 reserved = 97 usable" in text
    assert "now      40 x 15 = 600 connections, 619% of usable: does NOT fit" in text
    assert "advised  40 x 19 = 760 connections, 784% of usable: does NOT fit" in text
    assert "cap each process at 2 connections" in text  # floor(97 * 0.9 / 40)
    fits = "\n".join(fleet_lines(Budget(500, 3, 4, "4 replicas x 1 workers"), 15, 19))
    assert "advised  4 x 19 = 76 connections, 15% of usable: fits" in fits
    tight = "\n".join(fleet_lines(Budget(100, 3, 5, "5 replicas x 1 workers"), None, 18))
    assert "93% of usable: fits, but above the 90% warning line" in tight


def advise(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLWATCH_")}
    result = subprocess.run(
        [sys.executable, "-m", "poolwatch.cli", "advise", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    planted.scan(result.stdout + result.stderr, "the output of poolwatch advise")
    return result


async def steady_load(url: str, clients: int, seconds: float) -> int:
    """``clients`` sequential request loops for ``seconds``; returns the responses."""
    import aiohttp

    done = 0
    deadline = time.monotonic() + seconds

    async def client(session) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            async with session.get(url) as response:
                await response.read()
                assert response.status == 200
                done += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return done


def observed(output: str) -> tuple[float, float, int]:
    rate = float(re.search(r"observed\s+([\d.]+) checkouts/s", output).group(1))
    mean_ms = float(re.search(r"mean (\d+) ms", output).group(1))
    pool_size = int(re.search(r"recommend\s+pool_size=(\d+)", output).group(1))
    return rate, mean_ms, pool_size


def assert_formula(rate: float, mean_ms: float, pool_size: int) -> None:
    """The printed size is ceil(rate x hold x 1.5) for the printed (rounded) figures."""
    low = math.ceil((rate - 0.05) * (mean_ms - 0.5) / 1000 * 1.5)
    high = math.ceil((rate + 0.05) * (mean_ms + 0.5) / 1000 * 1.5)
    assert max(low, 1) <= pool_size <= max(high, 1)


async def test_advise_samples_a_live_app(postgres, app_server):
    env = {"SA_URL": postgres.dsn("postgresql+asyncpg"), "POOL_SIZE": "4", "MAX_OVERFLOW": "2"}
    server = app_server(APP, env)
    pool = f"127.0.0.1:{postgres.port}/app"
    command = asyncio.create_subprocess_exec(
        sys.executable, "-m", "poolwatch.cli", "advise", server.metrics_url,
        "--window", "4", "--interval", "0.25", "--max-connections", "20", "--replicas", "3",
        "--workers", "2", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    proc = await command
    responses = await steady_load(f"{server.url}/sa/hold?seconds=0.05", 3, 5.0)
    stdout, stderr = await proc.communicate()
    output = stdout.decode()
    assert proc.returncode == 0, stderr.decode()
    assert f"{pool} (SQLAlchemy, 1 process), now pool_size=4 max_overflow=2" in output
    rate, mean_ms, pool_size = observed(output)
    assert 50 <= mean_ms <= 150  # the route holds its connection 50 ms
    assert 0.5 * responses / 5.0 <= rate <= 1.2 * responses / 5.0
    assert re.search(r"peak used [123] ", output)  # 3 clients at most
    assert "timeouts 0" in output
    assert_formula(rate, mean_ms, pool_size)
    assert "fleet: 6 processes (3 replicas x 2 workers)" in output
    assert "now      6 x 6 = 36 connections, 212% of usable: does NOT fit" in output
    assert PASSWORD not in output


def _answers(url: str, needle: str) -> bool:
    try:
        return needle in get(url)
    except OSError:  # urllib's HTTPError/URLError: not up yet
        return False


def test_advise_reads_prometheus(postgres, app_server, tmp_path):
    server = app_server(APP, {"ASYNCPG_DSN": postgres.dsn(), "POOL_SIZE": "3", "MAX_OVERFLOW": "0"})
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: app\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.metrics_port}']}}]\n"
    )
    data = tempfile.mkdtemp(prefix="poolwatch-prom-")
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        wait_for_port(prom_port, proc=prom)
        up = f"{prom_url}/api/v1/query?query=up"
        deadline = time.monotonic() + 20
        while not _answers(up, '"value"') and time.monotonic() < deadline:
            time.sleep(0.5)  # Prometheus answers 503 until its TSDB is ready
        asyncio.run(steady_load(f"{server.url}/apg/hold?seconds=0.05", 2, 6.0))
        time.sleep(2.5)  # two more scrapes see the end of the load
        result = advise(
            "--prometheus", prom_url, "--range", "30s", "--selector", 'job="app"',
            "--max-connections", "10", "--replicas", "5",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        output = result.stdout
        assert f"127.0.0.1:{postgres.port}/app (asyncpg, 1 process), now max 3" in output
        rate, mean_ms, _ = observed(output.replace("min_size", "pool_size"))
        assert rate > 1 and 50 <= mean_ms <= 150
        assert re.search(r"recommend\s+min_size=\d+ max_size=\d+", output)
        assert "now      5 x 3 = 15 connections, 214% of usable: does NOT fit" in output
        wrong = advise("--prometheus", prom_url, "--selector", 'job="nope"')
        assert wrong.returncode == 2 and "no poolwatch pool series" in wrong.stderr
    finally:
        prom.terminate()
        prom.wait(timeout=10)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["http://127.0.0.1:{closed}/metrics"], "cannot reach http://127.0.0.1:"),
        (["--prometheus", "http://127.0.0.1:{closed}"], "cannot query Prometheus at"),
        (["ftp://example/metrics"], "is not an http(s) URL"),
        ([], "give either a /metrics URL to sample or --prometheus URL"),
        (["http://x/metrics", "--prometheus", "http://y"], "give either"),
        (
            ["--prometheus", "http://127.0.0.1:1", "--range", "an hour"],
            "is not a Prometheus duration",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    closed = free_port()
    result = advise(*(a.format(closed=closed) for a in args))
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_not_a_poolwatch_endpoint_and_unknown_pool(app_server, postgres):
    server = app_server(APP, {"SA_URL": postgres.dsn("postgresql+asyncpg")})
    result = advise(f"{server.url}/ok", "--window", "1")
    assert result.returncode == 2
    assert "is not a poolwatch /metrics endpoint" in result.stderr
    result = advise(server.metrics_url, "--window", "0.5", "--interval", "0.25", "--pool", "nope")
    assert result.returncode == 2
    assert "--pool 'nope' was not seen; pools seen: 127.0.0.1:" in result.stderr
    result = advise(server.metrics_url, "--max-connections", "-5")
    assert result.returncode == 2 and "--max-connections" in result.stderr


async def test_advise_and_top_through_the_sidecar_with_its_server_view(postgres, tmp_path):
    from tests.support.exporter import run_exporter, start_workers

    directory = str(tmp_path / "mp")
    env = {"POOLWATCH_MULTIPROC_DIR": directory, "SA_URL": postgres.dsn("postgresql+asyncpg")}
    app = start_workers("uvicorn", APP, 2, env)
    exporter = run_exporter(
        "--multiproc-dir", directory, env={"POOLWATCH_POSTGRES_DSN": postgres.dsn()}
    )
    pool = f"127.0.0.1:{postgres.port}/app"
    try:
        deadline = time.monotonic() + 30
        while len(exporter.scrape().find("db_client_connection_max")) < 2:
            assert time.monotonic() < deadline, "the two workers' pools never showed"
            time.sleep(0.2)
        url = f"{exporter.url}/metrics"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "poolwatch.cli", "advise", url, "--window", "4",
            "--interval", "0.5", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await steady_load(f"{app.url}/sa/hold?seconds=0.05", 4, 5.0)
        stdout, stderr = await proc.communicate()
        output = stdout.decode()
        assert proc.returncode == 0, stderr.decode()
        assert f"{pool} (SQLAlchemy, 2 processes), now pool_size=2 max_overflow=1" in output
        assert_formula(*observed(output))
        # max_connections and reserved slots come from the exporter's view of the server.
        assert (
            "fleet: 2 processes (seen in the data; set --replicas/--workers); server "
            "max_connections 200 - 3 reserved = 197 usable" in output
        )
        assert "now      2 x 3 = 6 connections, 3% of usable: fits" in output

        top = subprocess.Popen(
            [sys.executable, "-m", "poolwatch.cli", "top", url, "--interval", "0.5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "COLUMNS": "160"},
        )
        time.sleep(1.5)
        top.send_signal(subprocess.signal.SIGINT)
        screen, err = top.communicate(timeout=10)
        assert top.returncode == 0, err
        rows = {line.split()[1] for line in screen.splitlines() if line.strip().startswith(pool)}
        assert len(rows) == 2 and all(r.startswith("[") for r in rows)  # one row per worker
    finally:
        exporter.stop()
        app.stop()


async def burst(url: str, size: int, bursts: int, every: float) -> None:
    """``bursts`` times, ``size`` requests at once, then quiet until ``every`` s have passed."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            async with session.get(url) as response:
                assert response.status == 200, await response.text()

        for _ in range(bursts):
            started = time.monotonic()
            await asyncio.gather(*(one() for _ in range(size)))
            await asyncio.sleep(max(every - (time.monotonic() - started), 0))


async def test_advise_sees_bursts_whatever_its_interval_and_never_shrinks_a_queue(
    postgres, app_server
):
    """The issue's case: a 7-connection pool hit by bursts that queue (waits over 100 ms). At
    --interval 1 no sample used to land in a burst ("peak used 0", advice to shrink); with the
    high-water marks both intervals see the same peak and give the same advice, never smaller."""
    env = {
        "SA_URL": postgres.dsn("postgresql+asyncpg"),
        "POOL_SIZE": "5",
        "MAX_OVERFLOW": "2",
        "POOL_TIMEOUT": "10",
    }
    server = app_server(APP, env)
    pipe = asyncio.subprocess.PIPE
    commands = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "poolwatch.cli", "advise", server.metrics_url),
            *("--window", "7", "--interval", interval),
            stdout=pipe,
            stderr=pipe,
        )
        for interval in ("1", "0.2")
    ]
    for proc in commands:  # both took their first sample: the bursts fall inside both windows
        assert b"sampling" in await asyncio.wait_for(proc.stderr.readline(), 30)
    await burst(f"{server.url}/sa/hold?seconds=0.15", size=30, bursts=3, every=1.5)
    outputs = []
    for proc in commands:
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        outputs.append(stdout.decode())
        planted.scan(outputs[-1], "the output of poolwatch advise")
    advice = [re.search(r"recommend\s+pool_size=(\d+) max_overflow=(\d+)", o) for o in outputs]
    assert all(advice), outputs
    sizes = [tuple(map(int, a.groups())) for a in advice]
    for output, (pool_size, overflow) in zip(outputs, sizes, strict=True):
        peak = re.search(r"peak used (\d+) \(\+(\d+) pending\)", output)
        assert peak and int(peak.group(1)) == 7 and int(peak.group(2)) >= 15, output
        assert pool_size + overflow >= 7, output  # never smaller than the pool that queued
        assert "now pool_size=5 max_overflow=2" in output
        assert re.search(r"it queued \(wait p95 \d+ ms > 100 ms\)", output), output
    # the same burst, the same total (pool_size is Little's law over two windows a few ms apart)
    assert sizes[0][0] + sizes[0][1] == sizes[1][0] + sizes[1][1], outputs
    assert abs(sizes[0][0] - sizes[1][0]) <= 1, outputs
