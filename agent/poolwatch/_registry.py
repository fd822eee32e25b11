"""What the agent watches: a set of metric sources read at collect time, and unique pool names."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from ._log import errors
from ._types import Source
from ._version import __version__
from .metrics import AGENT_ERRORS, BUILD_INFO, Point


class Registry:
    def __init__(self) -> None:
        self._sources: list[Source] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def add(self, source: Source) -> None:
        with self._lock:
            if source not in self._sources:
                self._sources.append(source)

    def remove(self, source: Source) -> None:
        """Stop collecting ``source``; the pool name it held is free again."""
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)
                name = getattr(source, "name", None)
                self._names.discard(name)

    def sources(self) -> list[Source]:
        with self._lock:
            return list(self._sources)

    def claim_name(self, wanted: str) -> str:
        """``wanted`` if free, else ``wanted#2``, ``wanted#3``... (DESIGN §3, creation order)."""
        with self._lock:
            name, n = wanted, 1
            while name in self._names:
                n += 1
                name = f"{wanted}#{n}"
            self._names.add(name)
            return name

    def collect(self) -> Iterator[Point]:
        yield Point(BUILD_INFO, {"version": __version__}, 1)
        for source in self.sources():
            try:
                if not source.alive():  # gone without a close() poolwatch saw
                    self.remove(source)
                    continue
                yield from list(source.points())
            except Exception as exc:  # a broken source must not break the scrape
                errors.record(getattr(source, "probe", "exporter"), exc)
        for probe, count in sorted(errors.counts.items()):
            yield Point(AGENT_ERRORS, {"probe": probe}, count)
