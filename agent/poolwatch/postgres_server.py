"""Moved: the PostgreSQL server view is ``poolwatch.exporters.postgres`` since 0.1.0.

A thin re-export for code written against the old path (the sidecar command until it imports
the new one); it goes in poolwatch 0.2.0.
"""

from .exporters.postgres import InvalidDsn, PostgresView

__all__ = ["InvalidDsn", "PostgresView"]
