"""Exporters: where the agent's series go, read at collect time, never on the app's hot path.

``prometheus`` (the ``/metrics`` listener and collector), ``multiproc`` and ``prefork`` (several
workers behind one target), ``otlp`` and ``tracing`` (OpenTelemetry: the only modules of the
runtime that import it, and only when asked for), ``postgres`` (the sidecar's view of the
database server), ``_otel_env`` (the ``OTEL_*`` variables, without importing OpenTelemetry).
"""
