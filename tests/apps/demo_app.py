"""The demo's app (poolwatch.cli.demo.build_app) served by uvicorn, for soak tests.

``DEMO_DATABASE_URL``, ``DEMO_UPSTREAM_URL``; ``TEST_APP_BARE=1`` serves it without poolwatch.
"""

import os

from poolwatch.cli.demo import build_app

app = build_app(
    os.environ["DEMO_DATABASE_URL"],
    os.environ["DEMO_UPSTREAM_URL"],
    instrumented=os.environ.get("TEST_APP_BARE") != "1",
)
