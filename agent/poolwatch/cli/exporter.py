"""``poolwatch exporter``: the sidecar serving one ``/metrics`` for every live worker of a pod.

Workers started with ``POOLWATCH_MULTIPROC_DIR`` publish their metrics as files there
(``exporters/multiproc.py``); this process merges the live ones at each scrape, adds the database
server's view with ``--postgres-dsn``, and stops cleanly on SIGTERM. The listener, the token and
``/healthz`` are the agent's own (``exporters/prometheus.py``).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

DSN_ENV = "POOLWATCH_POSTGRES_DSN"


def add_arguments(parser: Any) -> None:
    from ._common import port, positive_seconds

    parser.add_argument(
        "--multiproc-dir",
        help="directory the workers publish to (default: $POOLWATCH_MULTIPROC_DIR)",
    )
    parser.add_argument(
        "--port", type=port, help="port of /metrics (default: $POOLWATCH_METRICS_PORT or 9464)"
    )
    parser.add_argument(
        "--addr", help="address to listen on (default: $POOLWATCH_METRICS_ADDR or 127.0.0.1)"
    )
    parser.add_argument(
        "--postgres-dsn",
        help=f"also report the PostgreSQL server's connections (default: ${DSN_ENV}); "
        "a password is better given by PGPASSWORD or a .pgpass file",
    )
    parser.add_argument(
        "--postgres-timeout",
        type=positive_seconds,
        default=2.0,
        help="connect/query timeout of the database view, seconds (2)",
    )
    parser.add_argument(
        "--stale-after",
        type=positive_seconds,
        default=None,
        help="ignore a live worker's file not rewritten for this long, seconds (10)",
    )


def run(args: Any) -> int:
    from prometheus_client import CollectorRegistry

    from .. import _log
    from .._log import logger
    from ..config import load_settings
    from ..exporters.multiproc import STALE_AFTER, WorkersCollector
    from ..exporters.prometheus import MetricsServer, PoolwatchCollector, metrics_app
    from ._common import UsageError

    _log.json_lines = True  # one JSON object per line on stderr: what a sidecar's collector reads
    # The agent's variables (POOLWATCH_MULTIPROC_DIR, _METRICS_ADDR/_PORT/_TOKEN), checked
    # the same way; options given on the command line win.
    overrides = {"multiproc_dir": args.multiproc_dir, "metrics_port": args.port}
    if args.addr is not None:
        overrides["metrics_addr"] = args.addr
    settings = load_settings({k: v for k, v in overrides.items() if v is not None})
    directory = settings.multiproc_dir
    if not directory:
        raise UsageError(
            "no directory to read: pass --multiproc-dir DIR or set POOLWATCH_MULTIPROC_DIR "
            "(the directory the workers publish to)"
        )
    try:
        os.makedirs(directory, exist_ok=True)
        os.listdir(directory)
    except OSError as exc:
        raise UsageError(
            f"--multiproc-dir/POOLWATCH_MULTIPROC_DIR={directory}: cannot read it "
            f"({exc.strerror or exc}); give a directory this process can read and write "
            "(in Kubernetes, an emptyDir mounted in the app and exporter containers)"
        ) from None

    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkersCollector(directory, args.stale_after or STALE_AFTER))
    view = None
    dsn = args.postgres_dsn or os.environ.get(DSN_ENV)
    if dsn:
        # Moves to poolwatch.exporters.postgres with the runtime's reorganisation: import it
        # from there once that lands.
        from ..exporters.postgres import InvalidDsn, PostgresView

        try:
            view = PostgresView(dsn, args.postgres_timeout)
        except InvalidDsn:
            raise UsageError(
                f"--postgres-dsn/{DSN_ENV} is not a valid PostgreSQL connection string: "
                "expected postgresql://USER@HOST:PORT/DATABASE or 'host=... user=...'"
            ) from None
        except ImportError:
            raise UsageError(
                "--postgres-dsn needs psycopg: pip install 'poolwatch[postgres]'"
            ) from None
        registry.register(PoolwatchCollector(view.points))

    def healthy() -> bool:
        return os.path.isdir(directory) and os.access(directory, os.R_OK | os.X_OK)

    app = metrics_app(registry, settings.metrics_token, healthy)
    try:
        server = MetricsServer(app, settings.metrics_addr, settings.metrics_port)
    except OSError as exc:
        where = f"{settings.metrics_addr}:{settings.metrics_port}"
        raise UsageError(
            f"--port/POOLWATCH_METRICS_PORT={settings.metrics_port}: cannot listen on {where} "
            f"({exc.strerror or exc}); choose a free port"
        ) from None

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    logger.info(
        "poolwatch exporter listening",
        addr=settings.metrics_addr,
        port=server.port,
        multiproc_dir=directory,
        postgres=(
            f"{view.server['server.address']}:{view.server['server.port']}" if view else None
        ),
        token=settings.metrics_token is not None,
    )
    stop.wait()
    server.stop()
    if view is not None:
        view.close()
    logger.info("poolwatch exporter stopped")
    return 0
