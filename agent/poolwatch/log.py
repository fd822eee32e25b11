"""structlog logger of the agent, and the error counter every hook reports to."""

from __future__ import annotations

import threading
import traceback
from collections import Counter

import structlog

logger = structlog.get_logger("poolwatch")

# Probes whose error counter is exported at 0 from the start, so rate() sees 0 rather than nothing.
PROBES = ("sqlalchemy", "asyncpg", "aiohttp", "loop", "asgi", "otlp", "exporter", "leaks")


class AgentErrors:
    """Counts exceptions caught inside hooks; logs the first of each (probe, type) only."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter({probe: 0 for probe in PROBES})
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def record(self, probe: str, exc: BaseException) -> None:
        key = (probe, type(exc).__name__)
        with self._lock:
            self.counts[probe] += 1
            first = key not in self._logged
            self._logged.add(key)
        if first:
            # The traceback as plain text: never exc_info, which structlog's rich renderer prints
            # with every frame's local variables (a hook's locals can hold a URL with a password
            # or a token). The message itself never holds user data.
            logger.error(
                "poolwatch hook failed; the app's call went on (logged once per kind)",
                probe=probe,
                error=type(exc).__name__,
                exception="".join(traceback.format_exception(exc)),
            )


errors = AgentErrors()
