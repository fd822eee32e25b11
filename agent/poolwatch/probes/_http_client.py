"""What the HTTP client probes (aiohttp, httpx) share: host labels under a cap, and the events
of one (client group, host) recorded on the hot path and read at collect time.

Host labels are ``server.address`` and ``server.port`` only (never user, path or query); past
``POOLWATCH_HTTP_CLIENT_MAX_HOSTS`` hosts, every new one is ``server.address="other"``. Each
probe holds its own :class:`HostLabels`, so the cap applies per client library.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from .._histogram import Histogram
from .._log import errors
from ..config import Settings

OTHER = ("other", "")  # server.address/server.port of hosts beyond the cap
ADDRESS, PORT, SCHEME = "server.address", "server.port", "url.scheme"
STATE, SCOPE, ERROR_TYPE = "http.connection.state", "scope", "error.type"

Host = tuple[str, str]  # (server.address, server.port) after the cap


class Events:
    """What happened to one (client group, host): recorded on the hot path, read at collect
    time."""

    __slots__ = ("duration", "errors", "wait_time")

    def __init__(self) -> None:
        self.wait_time = Histogram()
        self.duration = Histogram()
        self.errors: Counter[str] = Counter()


class HostLabels:
    """The capped host labels and the per-(group, host) events of one probe."""

    def __init__(self, probe: str) -> None:
        self.probe = probe
        self.lock = threading.Lock()
        self.agent: Any = None  # for POOLWATCH_HTTP_CLIENT_MAX_HOSTS, read when a host shows up
        self.hosts: dict[tuple[str | None, int | None], Host] = {}
        self.events: dict[tuple[str | None, Host], Events] = {}
        self.failed: set[str] = set()  # features found unreadable (counted once each)

    def reset(self, agent: Any = None) -> None:
        self.hosts.clear()
        self.events.clear()
        self.failed.clear()
        self.agent = agent

    def host(self, host: str | None, port: int | None) -> Host:
        """Host and port only; past the cap every new host is 'other'."""
        known = self.hosts.get((host, port))
        if known is not None:
            return known
        with self.lock:
            known = self.hosts.get((host, port))
            if known is None:
                settings = (self.agent and self.agent.settings) or Settings()
                if len(self.hosts) >= settings.http_client_max_hosts:
                    return OTHER  # not remembered: memory stays bounded however many follow
                known = self.hosts[(host, port)] = (host or "", str(port or ""))
            return known

    def events_for(self, name: str | None, host: Host) -> Events:
        events = self.events.get((name, host))
        if events is None:
            with self.lock:
                events = self.events.setdefault((name, host), Events())
        return events

    def error(self, name: str | None, host: Host, error_type: str) -> None:
        events = self.events_for(name, host)
        with self.lock:
            events.errors[error_type] += 1

    def unreadable(self, feature: str, exc: BaseException) -> None:
        """A figure this library version does not expose: its series is left out, counted
        once."""
        with self.lock:
            first = feature not in self.failed
            self.failed.add(feature)
        if first:
            errors.record(self.probe, exc)

    def snapshot(self) -> list[tuple[tuple[str | None, Host], Events]]:
        return list(self.events.items())

    def errors_of(self, events: Events) -> list[tuple[str, int]]:
        with self.lock:
            return sorted(events.errors.items())
