"""poolwatch: connection pools, event loop and HTTP metrics for async Python services.

from poolwatch import instrument
app = instrument(app)
"""

from ._version import __version__
from .agent import (
    instrument,
    uninstrument,
    watch_aiohttp_session,
    watch_asyncpg_pool,
    watch_engine,
    watch_event_loop,
    watch_httpx_client,
    watch_psycopg_pool,
    watch_redis_pool,
)
from .config import ConfigError

__all__ = [
    "ConfigError",
    "__version__",
    "instrument",
    "uninstrument",
    "watch_aiohttp_session",
    "watch_asyncpg_pool",
    "watch_engine",
    "watch_event_loop",
    "watch_httpx_client",
    "watch_psycopg_pool",
    "watch_redis_pool",
]
