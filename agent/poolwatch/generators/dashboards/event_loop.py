"""poolwatch / Event loop: lag, blocks and their culprits, pending tasks."""

from __future__ import annotations

from ... import metrics as m
from ...thresholds import Threshold
from .. import promql as q
from .kit import (
    RATE,
    TARGET,
    gd,
    graph,
    heatmap_panel,
    limits,
    new_dashboard,
    query,
    row,
    top_panel,
)


def build(t: dict[str, Threshold]) -> gd.Dashboard:
    lag = t["loop_lag_p99"]
    return (
        new_dashboard(
            "loop",
            "poolwatch / Event loop",
            "asyncio event loops: lag, blocking calls and the code that made them, tasks.",
        )
        .with_row(row(100, "Lag"))
        .with_panel(
            graph(
                2,
                "Event-loop lag p99",
                "How late the loop runs a timer callback: p99 of the worst worker and "
                f"over all workers. {limits(lag)} Lag delays every request of that worker. "
                "Find the culprit below and move the call off the loop (an async library, or "
                "asyncio.to_thread / run_in_executor).",
                [
                    query(f"max by (job) ({q.recorded('loop_lag_p99', TARGET)})", "{{job}} worst"),
                    query(q.quantile(m.LOOP_LAG, TARGET, "job", RATE), "{{job}} all workers"),
                ],
                unit="s",
                threshold=lag,
            )
        )
        .with_panel(
            heatmap_panel(
                3,
                "Lag distribution",
                "Heatmap of lag observations, all workers. A band at the top is a recurring "
                "block (see culprits below); a smear rising with load is CPU saturation (add "
                "workers or replicas).",
                q.increase_buckets(m.LOOP_LAG, TARGET, RATE),
            )
        )
        .with_panel(
            graph(
                4,
                "Fraction of time blocked",
                "Share of wall time the loop was blocked longer than POOLWATCH_BLOCK_THRESHOLD: "
                "worst worker and mean over workers. 10 % means one request in ten waits for a "
                "block to end. Fix the top culprit below first.",
                [
                    query(q.blocked_fraction("max", TARGET, RATE), "{{job}} worst"),
                    query(q.blocked_fraction("avg", TARGET, RATE), "{{job}} mean"),
                ],
                unit="percentunit",
                width=4,
            )
        )
        .with_row(row(200, "Who blocks the loop"))
        .with_panel(
            graph(
                5,
                "Blocks by culprit",
                "Loop blocks per minute by culprit: module:function of the innermost application "
                "frame that was running. The agent log has the stack and the HTTP route of each; "
                "move that call off the loop (an async library, or asyncio.to_thread).",
                [
                    query(
                        q.per_minute(m.LOOP_BLOCKS, TARGET, "job, culprit", RATE),
                        "{{job}} {{culprit}}",
                    )
                ],
                unit="cpm",
                bars=True,
                stack=True,
                width=16,
            )
        )
        .with_panel(
            top_panel(
                6,
                "Top culprits in the time range",
                "Blocks per culprit over the whole time range, most first. Fix the top one "
                "first: make the call async or run it in a thread.",
                q.top_culprits(TARGET),
                "{{job}} {{culprit}}",
            )
        )
        .with_row(row(300, "Tasks"))
        .with_panel(
            graph(
                7,
                "Pending tasks",
                "asyncio tasks not yet done: the worst worker and the sum over workers. It "
                "follows the load; a steady climb at constant load is a task leak (tasks "
                "created and never awaited or cancelled).",
                [
                    query(q.gauge("max", m.LOOP_TASKS, TARGET), "{{job}} worst"),
                    query(q.gauge("sum", m.LOOP_TASKS, TARGET), "{{job}} all workers"),
                ],
                unit="short",
                width=24,
            )
        )
    )
