"""A compact terminal view of poolwatch metrics, from parsed exposition text.

Used by ``poolwatch demo`` (its own endpoint) and ``poolwatch top`` (any endpoint).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

POOL = "db_client_connection_pool_name"


@dataclass
class PoolRow:
    name: str
    used: float = 0
    idle: float = 0
    max: float | None = None
    pending: float = 0
    timeouts: float = 0
    wait_count: float = 0
    wait_sum: float = 0


@dataclass
class Snapshot:
    pools: dict[str, PoolRow] = field(default_factory=dict)
    other: dict[str, float] = field(default_factory=dict)  # unlabelled totals by sample name


def parse(text: str) -> Snapshot:
    snap = Snapshot()
    pools: dict[str, PoolRow] = {}
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            totals[name] += value
            pool_name = labels.get(POOL)
            if pool_name is None:
                continue
            row = pools.setdefault(pool_name, PoolRow(pool_name))
            if name == "db_client_connection_count":
                setattr(row, labels.get("db_client_connection_state", "used"), value)
            elif name == "db_client_connection_max":
                row.max = value
            elif name == "db_client_connection_pending_requests":
                row.pending = value
            elif name == "db_client_connection_timeouts_total":
                row.timeouts = value
            elif name == "db_client_connection_wait_time_seconds_count":
                row.wait_count = value
            elif name == "db_client_connection_wait_time_seconds_sum":
                row.wait_sum = value
    snap.pools = pools
    snap.other = dict(totals)
    return snap


def bar(used: float, limit: float | None, width: int = 20) -> str:
    if not limit:
        return "-" * width
    filled = min(width, round(width * used / limit))
    return "#" * filled + "." * (width - filled)


def render_lines(
    snap: Snapshot, previous: Snapshot | None = None, interval: float = 1.0
) -> list[str]:
    """Plain-text lines: one per pool, then the loop line when the loop probe exports data."""
    lines = [
        f"{'pool':<32} {'used/max':<9} {'':<20} {'pending':>7} {'timeouts':>8} {'avg wait ms':>11}"
    ]
    for row in snap.pools.values():
        wait_ms = 0.0
        before = previous.pools.get(row.name) if previous else None
        count = row.wait_count - (before.wait_count if before else 0)
        if count > 0:
            wait_ms = 1000 * (row.wait_sum - (before.wait_sum if before else 0)) / count
        limit = f"{row.max:g}" if row.max is not None else "-"
        lines.append(
            f"{row.name[:32]:<32} {f'{row.used:g}/{limit}':<9} {bar(row.used, row.max)} "
            f"{row.pending:>7g} {row.timeouts:>8g} {wait_ms:>11.1f}"
        )
    blocks = snap.other.get("asyncio_event_loop_blocks_total")
    if blocks is not None:
        lag_count = snap.other.get("asyncio_event_loop_lag_seconds_count", 0)
        lag_sum = snap.other.get("asyncio_event_loop_lag_seconds_sum", 0)
        if previous is not None:
            lag_count -= previous.other.get("asyncio_event_loop_lag_seconds_count", 0)
            lag_sum -= previous.other.get("asyncio_event_loop_lag_seconds_sum", 0)
        mean_lag = 1000 * lag_sum / lag_count if lag_count > 0 else 0.0
        lines.append(f"event loop: mean lag {mean_lag:.1f} ms, blocks {blocks:g}")
    return lines
