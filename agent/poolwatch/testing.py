"""Read poolwatch's metrics in a test, as values, without a listener or a scrape::

    from poolwatch.testing import snapshot

    used = snapshot().value(
        "db_client_connection_count",
        db_client_connection_pool_name="127.0.0.1:5432/shop",
        db_client_connection_state="used",
    )

Names and labels are those of ``/metrics`` (the Prometheus names: a histogram is read as its
``_count``, ``_sum`` and ``_bucket`` samples, a counter as ``_total``). A snapshot is taken when
``snapshot()`` is called: gauges show the pools alive then; counters and histograms are
cumulative over the process, so compare two snapshots around what a test does.
"""

from __future__ import annotations

from prometheus_client.samples import Sample

from .agent import agent
from .exporters.prometheus import families

__all__ = ["Snapshot", "snapshot"]


class Snapshot:
    """The samples of one collection of the process's agent."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def find(self, name: str, **labels: str) -> list[Sample]:
        """Every sample named ``name`` whose labels include ``labels``."""
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample ``name`` with ``labels`` (others may be set too);
        ``LookupError`` if there is none or more than one."""
        found = self.find(name, **labels)
        if len(found) != 1:
            raise LookupError(f"{len(found)} samples for {name} {labels}")
        return found[0].value

    def get(self, name: str, default: float | None = None, **labels: str) -> float | None:
        """Like :meth:`value`, but ``default`` when there is no such sample."""
        found = self.find(name, **labels)
        if len(found) > 1:
            raise LookupError(f"{len(found)} samples for {name} {labels}")
        return found[0].value if found else default

    def label_values(self, name: str, label: str, **labels: str) -> set[str]:
        """The values ``label`` takes among the samples ``name`` with ``labels`` (e.g. the pool
        names: ``label_values("db_client_connection_max", "db_client_connection_pool_name")``)."""
        return {s.labels[label] for s in self.find(name, **labels) if label in s.labels}


def snapshot() -> Snapshot:
    """poolwatch's metrics now, as ``/metrics`` would show them."""
    return Snapshot([s for family in families(agent.registry.collect()) for s in family.samples])
