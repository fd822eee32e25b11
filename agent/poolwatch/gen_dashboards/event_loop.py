"""poolwatch / Event loop: lag, blocks and their culprits, pending tasks."""

from __future__ import annotations

from ..thresholds import Threshold
from .kit import (
    RATE,
    TARGET,
    buckets,
    gd,
    graph,
    heatmap_panel,
    limits,
    new_dashboard,
    per_minute,
    quantile,
    query,
    row,
    top_panel,
    worst_p99,
)


def build(t: dict[str, Threshold]) -> gd.Dashboard:
    lag = t["loop_lag_p99"]
    metric = "asyncio_event_loop_lag_seconds"
    blocks = "asyncio_event_loop_blocks_total"
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
                    query(worst_p99(metric, TARGET, "job"), "{{job}} worst"),
                    query(quantile(metric, TARGET, "job"), "{{job}} all workers"),
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
                buckets(metric, TARGET),
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
                    query(
                        f"max by (job) (rate(asyncio_event_loop_blocked_seconds_total"
                        f"{{{TARGET}}}[{RATE}]))",
                        "{{job}} worst",
                    ),
                    query(
                        f"avg by (job) (rate(asyncio_event_loop_blocked_seconds_total"
                        f"{{{TARGET}}}[{RATE}]))",
                        "{{job}} mean",
                    ),
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
                [query(per_minute(blocks, TARGET, "job, culprit"), "{{job}} {{culprit}}")],
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
                f"topk(10, sum by (job, culprit) (increase({blocks}{{{TARGET}}}[$__range])))",
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
                    query(f"max by (job) (asyncio_tasks{{{TARGET}}})", "{{job}} worst"),
                    query(f"sum by (job) (asyncio_tasks{{{TARGET}}})", "{{job}} all workers"),
                ],
                unit="short",
                width=24,
            )
        )
    )
