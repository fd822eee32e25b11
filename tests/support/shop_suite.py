"""Run the shop app's own test suite (tests/apps/shop) in a subprocess and read its outcome:
pass counts, poolwatch's log lines (by xdist worker), wall and CPU time."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from . import planted
from .apps import REPO

SHOP = os.path.join(REPO, "tests", "apps", "shop")
# a poolwatch line as its console renderer writes it: "date time [level   ] event [poolwatch] k=v"
_LINE = re.compile(r"^\S+ \S+ \[(\w+)\s*\] (.*?)\s+\[poolwatch\]")
_WORKER = re.compile(r"^\[(gw\d+)\] ")  # the header of a test's report under pytest-xdist
_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected)")
_SUMMARY = re.compile(r"^=*\s*\d+ \w+.* in [\d.]+s")  # "53 passed, 2 warnings in 7.93s"


@dataclass
class LogLine:
    worker: str  # "gw0", "gw1"...; "main" without xdist
    level: str
    text: str


@dataclass
class SuiteRun:
    returncode: int
    output: str
    wall: float  # seconds
    cpu: float  # user + system seconds of pytest and its workers
    counts: Counter = field(default_factory=Counter)
    lines: list[LogLine] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return self.counts["passed"]

    @property
    def failures(self) -> int:
        return self.counts["failed"] + self.counts["errors"]

    def logged(self, level: str) -> list[LogLine]:
        return [line for line in self.lines if line.level == level]


def run_shop_suite(
    database_url: str,
    *,
    poolwatch: bool,
    args: tuple[str, ...] = ("-n", "2"),
    env: dict[str, str] | None = None,
    timeout: float = 150,
) -> SuiteRun:
    """The shop's suite, unchanged: bare or with ``SHOP_POOLWATCH=1`` (the one-liner in its app
    factory). ``-rA`` shows every test's captured output, where poolwatch's lines land."""
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("POOLWATCH_")}
    full_env.update(
        PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "agent")]),
        SHOP_DATABASE_URL=database_url,
        SHOP_POOLWATCH="1" if poolwatch else "0",
        **(env or {}),
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        os.path.join(SHOP, "pytest.ini"),
        "-p",
        "no:cacheprovider",
        "-q",
        "-rA",
        *args,
        os.path.join(SHOP, "tests"),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    output = done.stdout + done.stderr
    planted.scan(output, "the shop suite's output")
    return SuiteRun(done.returncode, output, wall, cpu, _counts(done.stdout), _log_lines(output))


def _counts(stdout: str) -> Counter:
    summaries = [line for line in stdout.splitlines() if _SUMMARY.match(line)]
    summary = summaries[-1] if summaries else ""
    counts: Counter = Counter()
    for number, outcome in _COUNTS.findall(summary):
        counts["errors" if outcome == "error" else outcome] += int(number)
    return counts


def _log_lines(output: str) -> list[LogLine]:
    lines, worker = [], "main"
    for text in output.splitlines():
        if found := _WORKER.match(text):
            worker = found[1]
        elif found := _LINE.match(text):
            lines.append(LogLine(worker, found[1], found[2]))
    return lines
