"""Items: create, read, update, delete; the paginated, searchable list."""

from __future__ import annotations

import pytest


async def add(client, name: str, price_cents: int = 100, stock: int = 0) -> dict:
    response = await client.post(
        "/items", json={"name": name, "price_cents": price_cents, "stock": stock}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def test_create_returns_the_item_with_an_id(client):
    created = await add(client, "teapot", 1999, 3)
    assert created == {"id": 1, "name": "teapot", "price_cents": 1999, "stock": 3}


async def test_created_item_can_be_read_back(client, item):
    response = await client.get(f"/items/{item['id']}")
    assert response.status_code == 200
    assert response.json() == item


async def test_stock_defaults_to_zero(client):
    response = await client.post("/items", json={"name": "mug", "price_cents": 500})
    assert response.json()["stock"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"price_cents": 100},
        {"name": "", "price_cents": 100},
        {"name": "mug", "price_cents": -1},
        {"name": "mug", "price_cents": 100, "stock": -2},
        {"name": "mug", "price_cents": "cheap"},
    ],
)
async def test_invalid_item_is_refused(client, body):
    response = await client.post("/items", json=body)
    assert response.status_code == 422
    assert (await client.get("/items")).json()["total"] == 0


async def test_missing_item_is_404(client):
    response = await client.get("/items/999")
    assert response.status_code == 404
    assert response.json() == {"detail": "no such item"}


async def test_item_id_must_be_an_integer(client):
    assert (await client.get("/items/abc")).status_code == 422


async def test_patch_changes_only_what_is_given(client, item):
    response = await client.patch(f"/items/{item['id']}", json={"price_cents": 2000})
    assert response.status_code == 200
    assert response.json() == {**item, "price_cents": 2000}


async def test_patch_missing_item_is_404(client):
    assert (await client.patch("/items/7", json={"stock": 1})).status_code == 404


async def test_delete_removes_the_item(client, item):
    assert (await client.delete(f"/items/{item['id']}")).status_code == 204
    assert (await client.get(f"/items/{item['id']}")).status_code == 404


async def test_delete_missing_item_is_404(client):
    assert (await client.delete("/items/42")).status_code == 404


async def test_empty_list(client):
    response = await client.get("/items")
    assert response.json() == {"items": [], "total": 0, "limit": 20, "offset": 0}


@pytest.mark.parametrize(
    ("limit", "offset", "names"),
    [
        (2, 0, ["a0", "a1"]),
        (2, 2, ["a2", "a3"]),
        (3, 3, ["a3", "a4"]),
        (10, 5, []),
    ],
)
async def test_pagination(client, limit, offset, names):
    for n in range(5):
        await add(client, f"a{n}")
    page = (await client.get("/items", params={"limit": limit, "offset": offset})).json()
    assert [i["name"] for i in page["items"]] == names
    assert (page["total"], page["limit"], page["offset"]) == (5, limit, offset)


async def test_walking_every_page_sees_each_item_once(client):
    for n in range(23):
        await add(client, f"item {n}")
    seen, offset = [], 0
    while True:
        page = (await client.get("/items", params={"limit": 10, "offset": offset})).json()
        if not page["items"]:
            break
        seen += [i["id"] for i in page["items"]]
        offset += 10
    assert seen == list(range(1, 24))


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"offset": -1}])
async def test_page_bounds_are_checked(client, params):
    assert (await client.get("/items", params=params)).status_code == 422


async def test_search_is_case_insensitive_and_counted(client):
    for name in ("Blue mug", "red mug", "teapot"):
        await add(client, name)
    page = (await client.get("/items", params={"q": "MUG"})).json()
    assert [i["name"] for i in page["items"]] == ["Blue mug", "red mug"]
    assert page["total"] == 2


def test_crud_through_the_test_client(test_client):
    created = test_client.post("/items", json={"name": "pan", "price_cents": 3000}).json()
    assert test_client.get(f"/items/{created['id']}").json()["name"] == "pan"
    assert test_client.patch(f"/items/{created['id']}", json={"name": "wok"}).status_code == 200
    assert test_client.delete(f"/items/{created['id']}").status_code == 204
    assert test_client.get("/items").json()["total"] == 0
