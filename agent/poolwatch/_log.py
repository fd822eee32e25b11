"""The agent's logger, and the error counter every hook reports to.

Lines go through structlog. When the app configured structlog itself, poolwatch's lines follow
that configuration. Otherwise they are rendered as one console line each and written to stderr in
a single ``write()``: structlog's default ``PrintLogger`` uses ``print()``, which writes the text
and the newline apart, so on a stream shared with the app's own threads a line could be cut in
two by someone else's.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import Counter
from typing import Any

import structlog


class _WholeLines:
    """A structlog logger that writes each rendered line (newline included) in one call."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream or sys.stderr  # looked up per line: pytest swaps sys.stderr
        try:
            stream.write(message + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not break a hook
            pass

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


_own = structlog.wrap_logger(
    _WholeLines(),
    processors=[
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
        structlog.dev.ConsoleRenderer(colors=False),
    ],
    context_class=dict,
)


class _Logger:
    """``logger.warning(event, **fields)``: the app's structlog setup if it has one, else ours."""

    def __getattr__(self, level: str) -> Any:
        if structlog.is_configured():
            return getattr(structlog.get_logger("poolwatch"), level)
        return getattr(_own.bind(logger="poolwatch"), level)


logger = _Logger()

# Probes whose error counter is exported at 0 from the start, so rate() sees 0 rather than nothing.
PROBES = (
    "sqlalchemy", "asyncpg", "aiohttp", "loop", "asgi", "otlp", "exporter", "leaks", "diagnosis",
)  # fmt: skip


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
