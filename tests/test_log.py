"""poolwatch's log lines: whole lines on stderr in the console layout, the app's structlog set-up
followed when it has one, and structlog (with the rich it imports) never loaded for an app that
does not use it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import threading

import structlog

from poolwatch import _log
from tests.support.shop_suite import _LINE


def test_an_app_without_structlog_never_imports_it_and_gets_console_lines():
    script = textwrap.dedent(
        """
        import sys
        from starlette.applications import Starlette
        from poolwatch import instrument
        from poolwatch._log import errors
        app = instrument(Starlette(), metrics_port=0)
        errors.degraded("exporter", "poolwatch: the metrics listener is off: port 1 in use")
        print(sorted(m for m in ("structlog", "rich") if m in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
    line = done.stderr.strip().splitlines()[-1]
    match = _LINE.match(line)
    assert match, line
    assert match[1] == "warning"
    assert match[2] == "poolwatch: the metrics listener is off: port 1 in use"
    assert line.endswith("probe=exporter")


def test_lines_written_from_many_threads_are_never_cut(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)

    def write(worker: int) -> None:
        for n in range(200):
            _log.logger.info("a line from a thread", worker=worker, n=n, text="a b = c")

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 8 * 200
    assert all(_LINE.match(line) and " text='a b = c' " in line for line in lines)


def test_a_traceback_follows_its_line():
    line = _log.render("error", "hook failed", {"probe": "asyncpg", "exception": "Traceback\n  x"})
    first, *rest = line.splitlines()
    assert _LINE.match(first) and first.endswith("probe=asyncpg")
    assert rest == ["Traceback", "  x"]


def test_the_apps_structlog_configuration_is_followed(monkeypatch):
    stream = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(stream),
    )
    try:
        _log.logger.warning("pool exhausted", pool="db")
    finally:
        structlog.reset_defaults()
    record = json.loads(stream.getvalue())
    assert record == {"event": "pool exhausted", "pool": "db", "level": "warning"}


def test_json_lines_for_the_sidecar(monkeypatch):
    monkeypatch.setattr(_log, "json_lines", True)
    record = json.loads(_log.render("info", "exporter started", {"workers": 2}))
    assert record["event"] == "exporter started" and record["level"] == "info"
    assert record["workers"] == 2 and record["timestamp"].endswith("Z")
