"""Users: sign-up (scrypt on the loop) and log-in (scrypt in the thread pool)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

ADA = {"email": "ada@example.com", "password": "correct horse"}


async def test_sign_up_returns_id_and_email_only(client):
    response = await client.post("/users", json=ADA)
    assert response.status_code == 201
    assert response.json() == {"id": 1, "email": "ada@example.com"}


async def test_the_password_is_stored_salted_and_hashed(client, empty_database):
    await client.post("/users", json=ADA)
    await client.post("/users", json={**ADA, "email": "bob@example.com"})
    conn = await asyncpg.connect(empty_database)
    try:
        hashes = [r["password_hash"] for r in await conn.fetch("SELECT password_hash FROM users")]
    finally:
        await conn.close()
    assert len(set(hashes)) == 2  # same password, different salts
    assert all(ADA["password"] not in h for h in hashes)


async def test_an_email_registers_once(client, user):
    response = await client.post("/users", json=ADA)
    assert response.status_code == 409


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-email", "password": "long enough"},
        {"email": "eve@example.com", "password": "short"},
        {"email": "eve@example.com"},
    ],
)
async def test_invalid_sign_up_is_refused(client, body):
    assert (await client.post("/users", json=body)).status_code == 422


async def test_log_in_with_the_right_password(client, user):
    response = await client.post("/login", json=ADA)
    assert response.status_code == 200
    assert response.json() == user


async def test_log_in_with_a_wrong_password_is_401(client, user):
    response = await client.post("/login", json={**ADA, "password": "wrong horse"})
    assert response.status_code == 401


async def test_log_in_unknown_email_is_401(client):
    response = await client.post("/login", json={**ADA, "email": "nobody@example.com"})
    assert response.status_code == 401
    assert response.json() == {"detail": "wrong email or password"}


async def test_concurrent_sign_ups_all_land(client):
    bodies = [{"email": f"user{n}@example.com", "password": "password!"} for n in range(6)]
    responses = await asyncio.gather(*(client.post("/users", json=b) for b in bodies))
    assert sorted(r.status_code for r in responses) == [201] * 6
    assert len({r.json()["id"] for r in responses}) == 6


def test_sign_up_and_log_in_through_the_test_client(test_client):
    assert test_client.post("/users", json=ADA).status_code == 201
    assert test_client.post("/login", json=ADA).json()["email"] == ADA["email"]
    assert test_client.post("/login", json={**ADA, "password": "nope nope"}).status_code == 401
