"""``poolwatch advise --prometheus URL --range 1h``: the same observations from a Prometheus
server, over a range, with one instant query per figure (aggregated by pool in PromQL)."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request

from .advise import Observation, no_data
from .view import POOL

_DURATION = re.compile(r"^(?:\d+(?:ms|s|m|h|d|w|y))+$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(text: str) -> float:
    if not _DURATION.match(text):
        from .cli import UsageError

        raise UsageError(f"--range {text!r} is not a Prometheus duration; e.g. 30m, 1h, 1h30m, 7d")
    return sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text))


class Prometheus:
    def __init__(self, url: str, selector: str = "") -> None:
        self.url = url.rstrip("/")
        self.selector = selector.strip().strip("{}").strip()

    def series(self, name: str, extra: str = "") -> str:
        matchers = ",".join(m for m in (self.selector, extra) if m)
        return f"{name}{{{matchers}}}"

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        from .cli import UsageError

        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                reason = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                reason = exc.reason
            raise UsageError(f"Prometheus at {self.url} rejected a query: {reason}") from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise UsageError(
                f"cannot query Prometheus at {self.url} ({reason}): is this its base URL, "
                "e.g. http://prometheus:9090?"
            ) from None
        if not isinstance(body, dict) or body.get("status") != "success":
            raise UsageError(f"{self.url} did not answer like Prometheus' /api/v1/query")
        return [
            (item["metric"], float(item["value"][1]))
            for item in body["data"]["result"]
            if math.isfinite(float(item["value"][1]))
        ]

    def by_pool(self, promql: str) -> dict[str, float]:
        return {labels.get(POOL, ""): value for labels, value in self.query(promql)}

    def observe(self, range_text: str) -> list[Observation]:
        seconds = duration_seconds(range_text)
        r, by = range_text, f"by ({POOL})"
        pending = self.series("db_client_connection_pending_requests")
        used = self.series("db_client_connection_count", 'db_client_connection_state="used"')
        processes = self.by_pool(f"count {by} (last_over_time({pending}[{r}]))")
        if not processes:
            raise no_data(f"Prometheus at {self.url}", f"in the last {r}", self.selector)

        def increase(name: str) -> dict[str, float]:
            return self.by_pool(f"sum {by} (increase({self.series(name)}[{r}]))")

        def last(name: str) -> dict[str, float]:
            return self.by_pool(f"max {by} (last_over_time({self.series(name)}[{r}]))")

        checkouts = increase("db_client_connection_wait_time_seconds_count")
        timeouts = increase("db_client_connection_timeouts_total")
        hold_sum = increase("db_client_connection_use_time_seconds_sum")
        hold_count = increase("db_client_connection_use_time_seconds_count")
        buckets = self.query(
            f"sum by ({POOL}, le) "
            f"(increase({self.series('db_client_connection_use_time_seconds_bucket')}[{r}]))"
        )
        peak_used = self.by_pool(f"max {by} (max_over_time({used}[{r}]))")
        peak_demand = self.by_pool(
            f"max {by} (max_over_time(({used} + ignoring(db_client_connection_state) "
            f"{pending})[{r}:]))"
        )
        pool_size, maximum = last("db_client_connection_idle_max"), last("db_client_connection_max")
        sqlalchemy = last("sqlalchemy_pool_overflow")
        out = []
        for pool, count in sorted(processes.items()):
            obs = Observation(
                pool,
                seconds,
                processes=int(count),
                checkouts=checkouts.get(pool, 0),
                timeouts=timeouts.get(pool, 0),
                hold_sum=hold_sum.get(pool, 0),
                hold_count=hold_count.get(pool, 0),
                peak_used=peak_used.get(pool, 0),
                # the subquery's resolution may miss the raw peak: never below peak used
                peak_demand=max(peak_demand.get(pool, 0), peak_used.get(pool, 0)),
                pool_size=pool_size.get(pool),
                max=maximum.get(pool),
                sqlalchemy=pool in sqlalchemy,
            )
            obs.hold_buckets = {
                float(labels["le"]): value for labels, value in buckets if labels.get(POOL) == pool
            }
            out.append(obs)
        return out
