"""``pool_app`` plus a route that blocks the worker's event loop until the test releases it.

``GET /block/until?marker_dir=D&release=F`` writes ``D/blocked-<pid>`` (so the test knows which
workers are blocked), then sleeps *synchronously* on the loop until file ``F`` exists (at most
``limit`` seconds).
"""

from __future__ import annotations

import os
import time

from tests.apps.pool_app import app


@app.get("/block/until")
async def block_until(marker_dir: str, release: str, limit: float = 30.0):
    with open(os.path.join(marker_dir, f"blocked-{os.getpid()}"), "w"):
        pass
    deadline = time.monotonic() + limit
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)  # the bug under test: a sync wait on the event loop
    return {"pid": os.getpid()}
