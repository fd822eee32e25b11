"""Loopback helpers: free ports, waiting for a listener or a condition, scraping and reading
/metrics."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import planted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    check: Callable[[], Any], timeout: float = 30.0, what: str = "", interval: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something truthy, and return that; fail naming ``what``
    (else ``check``'s docstring) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    what = what or check.__doc__ or repr(check)
    raise AssertionError(f"not within {timeout}s: {what} (last: {last!r})")


def wait_for_port(port: int, timeout: float = 20.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


class Samples:
    """Parsed exposition text: ``samples.value("name", label=value)``."""

    def __init__(self, text: str) -> None:
        self.text = text
        planted.scan(text, "a /metrics exposition")
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def find(self, name: str, **labels: str) -> list:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        found = self.find(name, **labels)
        if len(found) != 1:
            raise LookupError(f"{len(found)} samples for {name} {labels}")
        return found[0].value

    def bucket(self, name: str, le: str, **labels: str) -> float:
        return self.value(f"{name}_bucket", le=le, **labels)


def scrape(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> Samples:
    return Samples(get(url, timeout, headers))
