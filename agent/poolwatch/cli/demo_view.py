"""What ``poolwatch demo`` shows: its load, its live view and its closing summary.

- The load runs on plain threads with ``http.client``: it never goes through aiohttp, so the
  app's aiohttp probe counts only the app's own session (its upstream), and a blocked app loop
  does not stop the load.
- The view is one screen redrawn in place (rich ``Live``) from the app's own ``/metrics``;
  piped, it prints one frame at the end of each phase instead.
- The agent's "event loop blocked" warnings are caught (a structlog processor) and shown as one
  "recent blocks" line, not a log line per block scrolling the view away.
- At the end, a summary of each phase and the next step.
"""

from __future__ import annotations

import http.client
import textwrap
import threading
import time
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from .scrape import Snapshot, parse
from .top import Screen, antipattern_line

RECENT = 5.0  # seconds of blocks on the "recent blocks" line

# what each phase does to the app, by the name in demo.PHASES
DESCRIPTIONS = {
    "healthy": "a light load: the pool has room",
    "pool exhaustion": "more requests than connections: they queue, then time out (503)",
    "blocked loop": "a sync call in a handler stalls the event loop",
}


class Load:
    """``clients`` threads, each a keep-alive HTTP/1.1 client; ``phase`` selects the shape."""

    def __init__(self, port: int, phases: tuple[tuple[str, int, str], ...]) -> None:
        self.port, self.phases, self.phase = port, phases, 0
        self.statuses: Counter[int] = Counter()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"demo-load-{i}", daemon=True)
            for i in range(max(p[1] for p in phases))
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=2)

    def _client(self, index: int) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            _, clients, route = self.phases[self.phase]
            if index >= clients:
                time.sleep(0.05)
                continue
            try:
                connection = connection or http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=10
                )
                connection.request("GET", route)
                response = connection.getresponse()
                response.read()
                with self._lock:
                    self.statuses[response.status] += 1
            except (OSError, http.client.HTTPException):
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(0.05)
            time.sleep(0.1 if route == "/report" else 0.005)
        if connection is not None:
            connection.close()

    def responses(self) -> dict[int, int]:
        with self._lock:
            return dict(sorted(self.statuses.items()))


class Blocks:
    """The agent's "event loop blocked" lines, kept instead of printed (a structlog processor);
    its other lines are kept as notes, shown under the view."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, str, float, str]] = deque(maxlen=500)
        self.notes: deque[str] = deque(maxlen=3)

    def install(self) -> None:
        import structlog

        structlog.configure(processors=[self._keep], cache_logger_on_first_use=False)

    def _keep(self, logger: Any, method: str, event: dict[str, Any]) -> Any:
        import structlog

        message = str(event.pop("event", ""))
        if message == "event loop blocked":
            route = str(event.get("route", ""))
            duration = float(event.get("duration_s", 0.0))
            self.events.append((time.monotonic(), str(event.get("culprit")), duration, route))
        elif method not in ("debug", "info"):
            code = f" ({event['code']})" if "code" in event else ""  # an anti-pattern's culprit
            self.notes.append(f"[{method}] {message}{code}")
        raise structlog.DropEvent

    def recent(self, now: float) -> str:
        recent = [e for e in self.events if now - e[0] <= RECENT]
        if not recent:
            return "recent blocks: none"
        groups: Counter[tuple[str, str]] = Counter((e[1], e[3]) for e in recent)
        parts = []
        for (culprit, route), count in groups.most_common(2):
            durations = [e[2] for e in recent if (e[1], e[3]) == (culprit, route)]
            where = f"{culprit} ({route})" if route else culprit
            parts.append(f"{count} x {1000 * max(durations):.0f} ms max in {where}")
        return f"recent blocks (last {RECENT:g} s): " + "; ".join(parts)


@dataclass
class PhaseStats:
    """What one phase showed, for the summary."""

    name: str
    clients: int
    route: str
    peak_used: float = 0
    pool_max: float | None = None
    peak_pending: float = 0
    timeouts: float = 0
    blocks: float = 0
    blocked_seconds: float = 0
    culprits: Counter[str] = field(default_factory=Counter)
    responses: Counter[int] = field(default_factory=Counter)


class View:
    def __init__(self, app_url: str, metrics_url: str, load: Load, blocks: Blocks) -> None:
        self.app_url, self.metrics_url, self.load, self.blocks = app_url, metrics_url, load, blocks
        self.screen = Screen(metrics_url, 1.0, _table())
        self.stats: list[PhaseStats] = []
        self.previous: Snapshot | None = None
        self._taken = time.monotonic()

    def fetch(self) -> Snapshot | None:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                return parse(response.read().decode())
        except OSError:
            return None

    def observe(self, snap: Snapshot, phase: int, responses: dict[int, int]) -> None:
        """Fold one refresh into the current phase's figures."""
        name, clients, route = self.load.phases[phase]
        if not self.stats or self.stats[-1].name != name:
            # the first refresh of a phase still shows the last one's requests: a baseline only
            self.stats.append(PhaseStats(name, clients, route))
            self._responses_at_start = responses
            return
        stats = self.stats[-1]
        before = self.previous
        for row in snap.pools.values():
            stats.peak_used = max(stats.peak_used, row.used)
            stats.pool_max = row.max
            stats.peak_pending = max(stats.peak_pending, row.pending)
            was = before.pools.get(row.name) if before else None
            stats.timeouts += max(row.timeouts - (was.timeouts if was else row.timeouts), 0)
        for loop in snap.loops.values():
            was_loop = before.loops.get(loop.name) if before else None
            for culprit, count in loop.blocks.items():
                new = count - (was_loop.blocks.get(culprit, 0) if was_loop else count)
                if new > 0 and culprit != "other":
                    stats.culprits[culprit] += int(new)
                    stats.blocks += new
            if was_loop is not None:
                stats.blocked_seconds += max(loop.blocked_seconds - was_loop.blocked_seconds, 0)
        stats.responses = Counter(
            {s: n - self._responses_at_start.get(s, 0) for s, n in responses.items()}
        )

    def frame(self, snap: Snapshot | None, phase: int, elapsed: float, total: float | None) -> Any:
        from rich.console import Group
        from rich.text import Text

        name, clients, route = self.load.phases[phase]
        clock = f"{elapsed:4.0f} s" + (f" of {total:g} s" if total else "  (Ctrl-C stops)")
        parts: list[Any] = [
            Text(f"poolwatch demo · app {self.app_url}", style="bold"),
            Text(f"metrics {self.metrics_url}"),
            Text.assemble(
                (f"phase {phase + 1}/{len(self.load.phases)}: {name}", "bold cyan"),
                f" · {clients} clients on GET {route} · {clock}",
            ),
            Text(f"  {DESCRIPTIONS.get(name, '')}"),
            Text(f"  responses: {_statuses(self.load.responses())}"),
        ]
        if snap is None:
            parts.append(Text("  (metrics unavailable, retrying)", style="yellow"))
        else:
            now = time.monotonic()
            parts.append(self.screen.pools(snap, self.previous, now - self._taken))
            # every part always there, each one line high: the screen keeps its height
            hosts = self.screen.hosts(snap, self.previous)
            if not snap.hosts:
                hosts.add_row("(no connections yet)")
            parts.append(hosts)
            for loop in snap.loops.values():
                before = self.previous.loops.get(loop.name) if self.previous else None
                parts.append(self.screen.loop(loop, before)[0])
            parts.append(Text(self.blocks.recent(now), no_wrap=True, overflow="ellipsis"))
            found = antipattern_line(snap, self.previous)
            if found is not None:
                parts.append(Text(found, no_wrap=True, overflow="ellipsis"))
            self.previous, self._taken = snap, now
        for note in self.blocks.notes:
            parts.append(Text(note, style="yellow"))
        return Group(*parts)

    def summary(self, metrics_port: str, width: int = 80) -> str:
        lines = ["", "poolwatch demo: what it showed"]
        for number, stats in enumerate(self.stats, 1):
            ok = stats.responses.get(200, 0)
            failed = sum(n for s, n in stats.responses.items() if s != 200)
            line = f"{number}. {stats.name}, {stats.clients} clients on {stats.route}: "
            line += f"pool at most {stats.peak_used:g}/{_num(stats.pool_max)} in use"
            if stats.peak_pending:
                line += f", up to {stats.peak_pending:g} requests waiting"
            if stats.timeouts:
                line += f", {stats.timeouts:g} checkouts timed out"
            if stats.blocks:
                culprit = stats.culprits.most_common(1)[0][0]
                line += (
                    f", the loop blocked {stats.blocks:g} times"
                    f" ({stats.blocked_seconds:.1f} s in all) in {culprit}"
                )
            line += f"; {ok} responses OK, {failed} failed."
            lines.append(textwrap.fill(line, width, initial_indent="  ", subsequent_indent="     "))
        lines += [
            "",
            "Next: measure your own app the same way. Install poolwatch, then:",
            "",
            "    from poolwatch import instrument",
            "    app = instrument(app)",
            "",
            f"and open http://127.0.0.1:{metrics_port}/metrics,",
            f"or watch it live: poolwatch top 127.0.0.1:{metrics_port}",
        ]
        return "\n".join(lines)


def _table() -> Any:
    from ..thresholds import load

    return load(None)


def _statuses(responses: dict[int, int]) -> str:
    if not responses:
        return "none yet"
    return "  ".join(f"{status} x {count}" for status, count in responses.items())


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
