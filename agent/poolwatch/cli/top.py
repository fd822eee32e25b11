"""``poolwatch top URL``: a live terminal view of any poolwatch ``/metrics`` (an app's or the
sidecar exporter's), coloured by the threshold table. ``poolwatch demo`` draws its pool, host
and loop lines with the same ``Screen``.

Quantiles and rates are taken between two refreshes (histogram bucket and counter deltas), so
the screen shows the last interval, not the process's lifetime; the first screen, with nothing
to compare with yet, shows quantiles since start and no rates.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..thresholds import Threshold, ThresholdError, load
from ._common import UsageError, positive_seconds
from .scrape import HostRow, LoopRow, PoolRow, Snapshot, delta, fetch, metrics_url, quantile

STYLES = {"ok": "green", "warning": "yellow", "critical": "bold red"}
TOP_CULPRITS = 5
BAR = 6  # characters: the screen fits 80 columns


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "url",
        type=metrics_url,
        help="a poolwatch /metrics URL, e.g. http://127.0.0.1:9464/metrics or 127.0.0.1:9464",
    )
    parser.add_argument(
        "--interval", type=positive_seconds, default=2.0, help="seconds between refreshes (2)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("POOLWATCH_METRICS_TOKEN"),
        help="bearer token of the endpoint (default: $POOLWATCH_METRICS_TOKEN)",
    )
    parser.add_argument(
        "--thresholds", help="TOML file overriding the threshold table (as `generate --overrides`)"
    )


def run(args: Any) -> int:
    from rich.console import Console
    from rich.live import Live

    try:
        table = load(args.thresholds)
    except ThresholdError as exc:
        raise UsageError(str(exc)) from None
    current = fetch(args.url, args.token)  # fails fast: unreachable, or not poolwatch
    console = Console()
    screen = Screen(args.url, args.interval, table)
    previous: Snapshot | None = None
    taken, elapsed = time.monotonic(), 0.0  # elapsed: between ``previous`` and ``current``
    frame = screen.render(current, None, elapsed, None)
    # On a terminal: an alternate screen redrawn in place, restored on exit, like top(1).
    # Piped: one frame after another, for logs.
    live: Any = (
        Live(frame, console=console, screen=True, auto_refresh=False)
        if console.is_terminal
        else _Printer(console, frame)
    )
    try:
        with live:
            while True:
                time.sleep(args.interval)
                error = None
                try:
                    snap, now = fetch(args.url, args.token), time.monotonic()
                    previous, current, elapsed, taken = current, snap, now - taken, now
                except UsageError as exc:  # keep the last screen; say what went wrong
                    error = str(exc)
                live.update(screen.render(current, previous, elapsed, error), refresh=True)
    except KeyboardInterrupt:
        return 0


class _Printer:
    """``Live``'s interface for output that is not a terminal: prints each frame."""

    def __init__(self, console: Any, frame: Any) -> None:
        self.console = console
        console.print(frame)

    def __enter__(self) -> _Printer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, frame: Any, refresh: bool = True) -> None:
        self.console.print(frame)


class Screen:
    def __init__(self, url: str, interval: float, table: dict[str, Threshold]) -> None:
        self.url, self.interval, self.table = url, interval, table

    def level(self, signal: str, value: float | None) -> str:
        if value is None or signal not in self.table:
            return "ok"
        return self.table[signal].level(value)

    def styled(self, text: str, signal: str, value: float | None) -> Any:
        from rich.text import Text

        return Text(text, style=STYLES[self.level(signal, value)])

    def render(
        self, snap: Snapshot, previous: Snapshot | None, elapsed: float, error: str | None
    ) -> Any:
        from rich.console import Group
        from rich.text import Text

        window = f"last {elapsed:.1f}s" if previous else "since start, rates next refresh"
        parts: list[Any] = [
            Text(f"poolwatch top · {self.url}", style="bold", no_wrap=True, overflow="ellipsis"),
            Text(f"every {self.interval:g}s · {window} · Ctrl-C quits"),
        ]
        if error:
            parts.append(Text(f"refresh failed, retrying: {error}", style="bold red"))
        parts.append(self.pools(snap, previous, elapsed))
        if snap.hosts:
            parts.append(self.hosts(snap, previous))
        for loop in snap.loops.values():
            parts.extend(self.loop(loop, previous.loops.get(loop.name) if previous else None))
        if (found := antipattern_line(snap, previous)) is not None:
            parts.append(Text(found, style="bold yellow" if "+" in found else ""))
        return Group(*parts)

    def pools(self, snap: Snapshot, previous: Snapshot | None, elapsed: float) -> Any:
        table = _table("connection pools")
        for column in ("pool", "used/max", "", "idle", "pending", "wait p99", "timeouts/min"):
            _column(table, column)
        _column(table, "overflow")
        _column(table, "leaks")
        if not snap.pools:
            table.add_row("(no pools yet)")
        for row in snap.pools.values():
            before = previous.pools.get(row.name) if previous else None
            table.add_row(*self.pool_cells(row, before, elapsed))
        return table

    def pool_cells(self, row: PoolRow, before: PoolRow | None, elapsed: float) -> list[Any]:
        utilization = row.used / row.max if row.max else None
        limit = f"{row.max:g}" if row.max is not None else "-"
        p99 = quantile(0.99, delta(row.wait_buckets, before.wait_buckets if before else None))
        per_minute = None
        if before is not None and elapsed > 0:
            per_minute = max(row.timeouts - before.timeouts, 0) * 60 / elapsed
        overflow: Any = "-"
        if row.overflow is not None and row.max is not None and row.idle_max is not None:
            max_overflow = row.max - row.idle_max
            usage = row.overflow / max_overflow if max_overflow > 0 else None
            overflow = self.styled(f"{row.overflow:g}/{max_overflow:g}", "overflow_usage", usage)
        return [
            row.name,
            self.styled(f"{row.used:g}/{limit}", "pool_utilization", utilization),
            self.styled(bar(row.used, row.max, BAR), "pool_utilization", utilization),
            f"{row.idle:g}",
            f"{row.pending:g}",
            self.styled(_ms(p99), "connection_wait_p99", p99),
            self.styled(
                "-" if per_minute is None else f"{per_minute:.1f}", "failed_checkouts", per_minute
            ),
            overflow,
            f"{row.leaks:g}",
        ]

    def hosts(self, snap: Snapshot, previous: Snapshot | None) -> Any:
        table = _table("HTTP client connections (aiohttp, httpx)")
        for column in ("host", "active/limit", "", "idle", "pending", "wait p99"):
            _column(table, column)
        for row in snap.hosts.values():
            before: HostRow | None = previous.hosts.get(row.name) if previous else None
            utilization = row.active / row.limit if row.limit else None
            p99 = quantile(0.99, delta(row.wait_buckets, before.wait_buckets if before else None))
            limit = f"{row.limit:g}" if row.limit else "-"
            table.add_row(
                row.name,
                self.styled(f"{row.active:g}/{limit}", "http_client_utilization", utilization),
                self.styled(
                    bar(row.active, row.limit, BAR), "http_client_utilization", utilization
                ),
                f"{row.idle:g}",
                f"{row.pending:g}",
                self.styled(_ms(p99), "connection_wait_p99", p99),
            )
        return table

    def loop(self, row: LoopRow, before: LoopRow | None) -> list[Any]:
        from rich.text import Text

        p99 = quantile(0.99, delta(row.lag_buckets, before.lag_buckets if before else None))
        blocked = row.blocked_seconds - (before.blocked_seconds if before else 0)
        line = Text(f"event loop{f' [{row.name}]' if row.name else ''}: lag p99 ", style="bold")
        line.append_text(self.styled(_ms(p99), "loop_lag_p99", p99))
        line.append(f"   blocked {blocked:.2f}s   tasks {row.tasks:g}")
        lines: list[Any] = [line]
        ranked = sorted(row.blocks.items(), key=lambda item: -item[1])[:TOP_CULPRITS]
        if ranked:
            lines.append(Text("  top culprits (blocks so far, +new):", style="bold"))
        for culprit, count in ranked:
            new = count - (before.blocks.get(culprit, 0) if before else 0)
            lines.append(Text(f"    {count:>6g}  +{new:<4g} {culprit}"))
        return lines


def antipattern_line(snap: Snapshot, previous: Snapshot | None) -> str | None:
    """``anti-patterns: n_plus_one 3 (+1)  ...`` (the app's log names the code); None when the
    diagnosis exports nothing, ``none caught`` when every count is 0."""
    if not snap.antipatterns:
        return None
    found = []
    for kind, count in sorted(snap.antipatterns.items()):
        new = count - (previous.antipatterns.get(kind, 0) if previous else 0)
        if count:
            found.append(f"{kind} {count:g}" + (f" (+{new:g})" if new > 0 else ""))
    shown = "  ".join(found) or "none caught"
    return f"anti-patterns: {shown}" + ("  (the app's log names the code)" if found else "")


def _table(title: str) -> Any:
    from rich import box
    from rich.table import Table

    # one space between columns, none at the edges: nine columns fit 80 characters
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
    )


def _column(table: Any, header: str) -> None:
    """The first column (a name) gives way with an ellipsis; numbers and bars never wrap."""
    if not table.columns:
        table.add_column(header, justify="left", overflow="ellipsis", ratio=1)
    elif header == "timeouts/min":  # the widest header, over two lines
        table.add_column("timeouts\n/min", justify="right", no_wrap=True)
    else:
        table.add_column(header, justify="left" if not header else "right", no_wrap=True)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    milliseconds = seconds * 1000
    return f"{milliseconds:.1f} ms" if milliseconds < 10 else f"{milliseconds:.0f} ms"


def bar(used: float, limit: float | None, width: int = 20) -> str:
    if not limit:
        return "-" * width
    filled = min(width, round(width * used / limit))
    return "#" * filled + "." * (width - filled)
