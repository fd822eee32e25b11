"""The shop's fixtures: a database per pytest-xdist worker, emptied before each test; a fresh app
per test, started with LifespanManager and driven by httpx; or a Starlette TestClient."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.testclient import TestClient

from tests.apps.shop.app import SCHEMA, TABLES, create_app


async def _recreate(server_url: str, url: str, name: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()


async def _drop(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _empty(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_url() -> str:
    """This worker's own database on the server of SHOP_DATABASE_URL, with the schema."""
    server_url = os.environ["SHOP_DATABASE_URL"]
    name = f"shop_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    url = f"{server_url.rsplit('/', 1)[0]}/{name}"
    asyncio.run(_recreate(server_url, url, name))
    yield url
    asyncio.run(_drop(server_url, name))


@pytest.fixture
def empty_database(database_url: str) -> str:
    asyncio.run(_empty(database_url))
    return database_url


@pytest.fixture
async def app(empty_database: str):
    app = create_app(database_url=empty_database)
    async with LifespanManager(app):
        yield app


@pytest.fixture
async def client(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        yield client


@pytest.fixture
def test_client(empty_database: str):
    with TestClient(create_app(database_url=empty_database)) as client:
        yield client


@pytest.fixture
async def item(client) -> dict:
    response = await client.post("/items", json={"name": "kettle", "price_cents": 2500, "stock": 5})
    return response.json()


@pytest.fixture
async def user(client) -> dict:
    credentials = {"email": "ada@example.com", "password": "correct horse"}
    response = await client.post("/users", json=credentials)
    return response.json()
