"""Orders: stock taken in a transaction, never oversold under concurrency."""

from __future__ import annotations

import asyncio


async def order(client, user, item, quantity=1):
    return await client.post(
        "/orders", json={"user_id": user["id"], "item_id": item["id"], "quantity": quantity}
    )


async def test_an_order_takes_stock_and_prices_it(client, user, item):
    response = await order(client, user, item, 2)
    assert response.status_code == 201
    assert response.json()["total_cents"] == 2 * item["price_cents"]
    assert (await client.get(f"/items/{item['id']}")).json()["stock"] == item["stock"] - 2


async def test_not_enough_stock_is_409_and_takes_nothing(client, user, item):
    response = await order(client, user, item, item["stock"] + 1)
    assert response.status_code == 409
    assert (await client.get(f"/items/{item['id']}")).json()["stock"] == item["stock"]


async def test_unknown_item_is_404(client, user):
    assert (await order(client, user, {"id": 404})).status_code == 404


async def test_unknown_user_is_404(client, item):
    assert (await order(client, {"id": 404}, item)).status_code == 404


async def test_quantity_must_be_positive(client, user, item):
    assert (await order(client, user, item, 0)).status_code == 422


async def test_a_users_orders_are_listed_in_order(client, user, item):
    for quantity in (1, 3):
        await order(client, user, item, quantity)
    listed = (await client.get(f"/users/{user['id']}/orders")).json()
    assert [o["quantity"] for o in listed] == [1, 3]


async def test_no_orders_is_an_empty_list(client, user):
    assert (await client.get(f"/users/{user['id']}/orders")).json() == []


async def test_concurrent_orders_never_oversell(client, user, item):
    # twelve buyers at once for five kettles, through a pool of at most five connections
    responses = await asyncio.gather(*(order(client, user, item) for _ in range(12)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] * 5 + [409] * 7
    assert (await client.get(f"/items/{item['id']}")).json()["stock"] == 0


async def test_an_ordered_item_cannot_be_deleted(client, user, item):
    await order(client, user, item)
    response = await client.delete(f"/items/{item['id']}")
    assert response.status_code == 409
    assert (await client.get(f"/items/{item['id']}")).status_code == 200
