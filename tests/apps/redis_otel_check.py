"""``python -m tests.apps.redis_otel_check REDIS_URL GROUP...``: redis-py's own OpenTelemetry
metrics on (the metric groups named), poolwatch instrumented; one redis command, then prints
one JSON line: the metric names each side exported for that redis pool."""

from __future__ import annotations

import asyncio
import json
import sys

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from redis.observability import get_observability_instance
from redis.observability.config import MetricGroup, OTelConfig

import poolwatch
from poolwatch.testing import snapshot


async def main(url: str, groups: list[str]) -> None:
    import redis.asyncio

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    get_observability_instance().init(
        OTelConfig(metric_groups=[getattr(MetricGroup, g) for g in groups])
    )
    poolwatch.instrument(metrics_port=0)
    client = redis.asyncio.Redis.from_url(url, max_connections=2)
    await client.ping()
    pool = client.connection_pool
    name = poolwatch.probes.redis.pool_name(pool)  # type: ignore[attr-defined]
    ours = {
        s.name.removesuffix("_total").removesuffix("_count").removesuffix("_seconds")
        for s in snapshot().samples
        if s.labels.get("db_client_connection_pool_name") == name
        and not s.name.endswith("_sum")
        and not s.name.endswith("_bucket")
    }
    theirs = {
        m.name
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    await client.aclose()
    print(json.dumps({"poolwatch": sorted(ours), "redis_py": sorted(theirs)}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
