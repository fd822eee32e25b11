"""The agent's logger, and the error counter every hook reports to.

When the app configured structlog, poolwatch's lines go through that configuration. Otherwise
poolwatch renders each line itself, in structlog's console layout (or as one JSON object, for the
sidecar), and writes it to stderr in a single ``write()``, so that on a stream shared with the
app's threads no line is cut in two. Rendering by hand (some 30 lines) rather than through
structlog keeps structlog out of the app's start-up when the app does not use it: importing it
pulls in ``rich`` wherever that is installed (FastAPI's CLI brings it), ~0.3 s of CPU in every
process, worker and test-suite worker alike.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any

# the sidecar (`poolwatch exporter`) logs JSON lines, what a log collector reads
json_lines = False
_QUOTE = frozenset(" \t=\r\n\"'")


def _value(value: Any) -> str:
    """As structlog's console renderer shows a value: a plain word bare, anything else repr()."""
    if isinstance(value, str) and not _QUOTE.intersection(value):
        return value
    return repr(value)


def render(level: str, event: str, fields: dict[str, Any]) -> str:
    """One line: ``date time [level    ] event   [poolwatch] key=value ...`` (keys sorted), a
    traceback given as ``exception=`` on the lines below it."""
    now = time.time()
    if json_lines:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        record = {"event": event, "logger": "poolwatch", "level": level, "timestamp": stamp}
        return json.dumps({**fields, **record}, default=repr)
    exception = fields.pop("exception", None)
    pairs = " ".join(f"{key}={_value(fields[key])}" for key in sorted(fields))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    line = f"{stamp} [{level:<9}] {event:<30} [poolwatch] {pairs}".rstrip()
    return f"{line}\n{exception.rstrip()}" if exception else line


def _write(level: str, event: str, **fields: Any) -> None:
    level = {"warn": "warning", "exception": "error", "fatal": "critical", "msg": "info"}.get(
        level, level
    )
    try:
        line = render(level, event, fields)
        stream = sys.stderr  # looked up per line: pytest swaps sys.stderr
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError, AttributeError):  # a closed stream must not break a hook
        pass


class _Logger:
    """``logger.warning(event, **fields)``: the app's structlog setup if it has one, else ours."""

    def __getattr__(self, level: str) -> Any:
        structlog = sys.modules.get("structlog")  # never imported by poolwatch itself
        if structlog is not None and structlog.is_configured():
            return getattr(structlog.get_logger("poolwatch"), level)
        return functools.partial(_write, level)


logger = _Logger()

# Probes whose error counter is exported at 0 from the start, so rate() sees 0 rather than nothing.
PROBES = (
    "sqlalchemy",
    "asyncpg",
    "aiohttp",
    "httpx",
    "redis",
    "psycopg_pool",
    "loop",
    "asgi",
    "otlp",
    "exporter",
    "leaks",
    "diagnosis",
)


class AgentErrors:
    """Counts exceptions caught inside hooks; logs the first of each (probe, type) only."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter({probe: 0 for probe in PROBES})
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _first(self, probe: str, kind: str) -> bool:
        with self._lock:
            self.counts[probe] += 1
            first = (probe, kind) not in self._logged
            self._logged.add((probe, kind))
        return first

    def record(self, probe: str, exc: BaseException) -> None:
        if self._first(probe, type(exc).__name__):
            # The traceback as plain text: never exc_info, which structlog's rich renderer prints
            # with every frame's local variables (a hook's locals can hold a URL with a password
            # or a token). The message itself never holds user data.
            logger.error(
                "poolwatch hook failed; the app's call went on (logged once per kind)",
                probe=probe,
                error=type(exc).__name__,
                exception="".join(traceback.format_exception(exc)),
            )

    def degraded(self, probe: str, message: str) -> None:
        """Something of the environment keeps a part of poolwatch off (a taken port, a collector
        down): counted, and ``message`` (what is off, and the fix) logged once as one line."""
        if self._first(probe, message):
            logger.warning(message, probe=probe)


errors = AgentErrors()
