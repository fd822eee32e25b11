"""The shop's application factory and routes (see the package docstring)."""

from __future__ import annotations

import hashlib
import hmac
import os

import asyncpg
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id serial PRIMARY KEY,
    name text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0),
    stock integer NOT NULL DEFAULT 0 CHECK (stock >= 0)
);
CREATE TABLE IF NOT EXISTS users (
    id serial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    password_hash text NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id serial PRIMARY KEY,
    user_id integer NOT NULL REFERENCES users(id),
    item_id integer NOT NULL REFERENCES items(id),
    quantity integer NOT NULL CHECK (quantity > 0),
    total_cents integer NOT NULL
);
"""
TABLES = "orders, users, items"


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    price_cents: int = Field(ge=0)
    stock: int = Field(default=0, ge=0)


class ItemPatch(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    price_cents: int | None = Field(default=None, ge=0)
    stock: int | None = Field(default=None, ge=0)


class Item(ItemIn):
    id: int


class ItemPage(BaseModel):
    items: list[Item]
    total: int
    limit: int
    offset: int


class Credentials(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    password: str = Field(min_length=8)


class User(BaseModel):
    id: int
    email: str


class OrderIn(BaseModel):
    user_id: int
    item_id: int
    quantity: int = Field(gt=0)


class Order(OrderIn):
    id: int
    total_cents: int


# --- passwords: scrypt is deliberately slow (tens of milliseconds of CPU) ---------------------
def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"{salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    salt, digest = stored.split("$")
    again = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=2**14, r=8, p=1)
    return hmac.compare_digest(again.hex(), digest)


router = APIRouter()


def pool(request: Request) -> asyncpg.Pool:
    return request.app.state.pool


@router.get("/health")
async def health(request: Request) -> dict:
    return {"ok": await pool(request).fetchval("SELECT 1") == 1}


@router.post("/items", status_code=201, response_model=Item)
async def create_item(item: ItemIn, request: Request) -> dict:
    row = await pool(request).fetchrow(
        "INSERT INTO items (name, price_cents, stock) VALUES ($1, $2, $3) RETURNING *",
        item.name,
        item.price_cents,
        item.stock,
    )
    return dict(row)


@router.get("/items", response_model=ItemPage)
async def list_items(
    request: Request,
    limit: int = Query(20, ge=1, le=100),
    offset: int = Query(0, ge=0),
    q: str | None = None,
) -> dict:
    pattern = f"%{q}%" if q else "%"
    async with pool(request).acquire() as conn:
        total = await conn.fetchval("SELECT count(*) FROM items WHERE name ILIKE $1", pattern)
        rows = await conn.fetch(
            "SELECT * FROM items WHERE name ILIKE $1 ORDER BY id LIMIT $2 OFFSET $3",
            pattern,
            limit,
            offset,
        )
    return {"items": [dict(r) for r in rows], "total": total, "limit": limit, "offset": offset}


@router.get("/items/{item_id}", response_model=Item)
async def get_item(item_id: int, request: Request) -> dict:
    row = await pool(request).fetchrow("SELECT * FROM items WHERE id = $1", item_id)
    if row is None:
        raise HTTPException(404, "no such item")
    return dict(row)


@router.patch("/items/{item_id}", response_model=Item)
async def update_item(item_id: int, patch: ItemPatch, request: Request) -> dict:
    row = await pool(request).fetchrow(
        "UPDATE items SET name = coalesce($2, name), price_cents = coalesce($3, price_cents),"
        " stock = coalesce($4, stock) WHERE id = $1 RETURNING *",
        item_id,
        patch.name,
        patch.price_cents,
        patch.stock,
    )
    if row is None:
        raise HTTPException(404, "no such item")
    return dict(row)


@router.delete("/items/{item_id}", status_code=204)
async def delete_item(item_id: int, request: Request) -> Response:
    try:
        done = await pool(request).execute("DELETE FROM items WHERE id = $1", item_id)
    except asyncpg.ForeignKeyViolationError:
        raise HTTPException(409, "the item has orders") from None
    if done == "DELETE 0":
        raise HTTPException(404, "no such item")
    return Response(status_code=204)


@router.post("/users", status_code=201, response_model=User)
async def sign_up(credentials: Credentials, request: Request) -> dict:
    password_hash = hash_password(credentials.password)  # on the loop, as many apps do
    try:
        row = await pool(request).fetchrow(
            "INSERT INTO users (email, password_hash) VALUES ($1, $2) RETURNING id, email",
            credentials.email,
            password_hash,
        )
    except asyncpg.UniqueViolationError:
        raise HTTPException(409, "email already registered") from None
    return dict(row)


@router.post("/login", response_model=User)
async def log_in(credentials: Credentials, request: Request) -> dict:
    row = await pool(request).fetchrow(
        "SELECT id, email, password_hash FROM users WHERE email = $1", credentials.email
    )
    if row is None or not await run_in_threadpool(
        verify_password, credentials.password, row["password_hash"]
    ):
        raise HTTPException(401, "wrong email or password")
    return {"id": row["id"], "email": row["email"]}


@router.post("/orders", status_code=201, response_model=Order)
async def place_order(order: OrderIn, request: Request) -> dict:
    async with pool(request).acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT true FROM users WHERE id = $1", order.user_id):
            raise HTTPException(404, "no such user")
        item = await conn.fetchrow(
            "SELECT price_cents, stock FROM items WHERE id = $1 FOR UPDATE", order.item_id
        )
        if item is None:
            raise HTTPException(404, "no such item")
        if item["stock"] < order.quantity:
            raise HTTPException(409, "not enough stock")
        await conn.execute(
            "UPDATE items SET stock = stock - $2 WHERE id = $1", order.item_id, order.quantity
        )
        row = await conn.fetchrow(
            "INSERT INTO orders (user_id, item_id, quantity, total_cents)"
            " VALUES ($1, $2, $3, $4) RETURNING *",
            order.user_id,
            order.item_id,
            order.quantity,
            order.quantity * item["price_cents"],
        )
    return dict(row)


@router.get("/users/{user_id}/orders", response_model=list[Order])
async def user_orders(user_id: int, request: Request) -> list[dict]:
    rows = await pool(request).fetch("SELECT * FROM orders WHERE user_id = $1 ORDER BY id", user_id)
    return [dict(r) for r in rows]


def create_app(instrumented: bool | None = None, database_url: str | None = None) -> FastAPI:
    """A fresh shop. ``instrumented``: add poolwatch's one-liner (default: ``SHOP_POOLWATCH=1``);
    ``database_url`` (default: ``SHOP_DATABASE_URL``)."""
    if instrumented is None:
        instrumented = os.environ.get("SHOP_POOLWATCH") == "1"
    dsn = database_url or os.environ["SHOP_DATABASE_URL"]
    app = FastAPI(title="shop")
    app.include_router(router)

    @app.on_event("startup")
    async def open_pool() -> None:
        app.state.pool = await asyncpg.create_pool(dsn, min_size=2, max_size=5)

    @app.on_event("shutdown")
    async def close_pool() -> None:
        await app.state.pool.close()

    if instrumented:
        from poolwatch import instrument

        instrument(app)
    return app
