"""The shop: a small FastAPI application with its own test suite, standing in for a user's app.

poolwatch's own tests run the shop's suite unchanged, bare and with the one-liner, to prove that
an app's test suite passes the same with poolwatch on (``tests/test_app_suite.py``,
``bench/bench_app_suite.py``). It has the shape users' apps have, not one made to suit poolwatch:

- ``app.create_app()`` builds a fresh app; ``SHOP_POOLWATCH=1`` adds ``instrument(app)`` there, as
  a user would add the one-liner. The asyncpg pool is made in a ``startup`` handler and closed in
  a ``shutdown`` handler; ``SHOP_DATABASE_URL`` says where PostgreSQL is.
- Routes: CRUD on items, a paginated and searchable item list, sign-up hashing the password with
  scrypt on the event loop (CPU-heavy, synchronous), log-in verifying it in the thread pool,
  orders taking stock in a transaction, a health check, and FastAPI's ``/openapi.json``.
- ``tests/``: its own pytest suite (its own ``pytest.ini``, so poolwatch's conftest and plugins
  stay out). Each test builds a fresh app and drives it with asgi-lifespan's
  ``LifespanManager`` and httpx's ``ASGITransport``; some use Starlette's ``TestClient``. Each
  pytest-xdist worker gets its own database, emptied before every test.

Run it by hand with a PostgreSQL at hand::

    SHOP_DATABASE_URL=postgresql://postgres:PW@127.0.0.1:5432/app [SHOP_POOLWATCH=1] \\
        pytest -c tests/apps/shop/pytest.ini -n 2 tests/apps/shop/tests
"""
