"""Health, the OpenAPI schema and the docs, unknown routes."""

from __future__ import annotations


async def test_health_asks_the_database(client):
    response = await client.get("/health")
    assert response.json() == {"ok": True}


async def test_openapi_lists_every_route(client):
    schema = (await client.get("/openapi.json")).json()
    assert schema["info"]["title"] == "shop"
    assert set(schema["paths"]) == {
        "/health",
        "/items",
        "/items/{item_id}",
        "/users",
        "/login",
        "/orders",
        "/users/{user_id}/orders",
    }
    assert set(schema["paths"]["/items/{item_id}"]) == {"get", "patch", "delete"}


async def test_openapi_describes_the_models(client):
    components = (await client.get("/openapi.json")).json()["components"]["schemas"]
    assert {"Item", "ItemIn", "ItemPage", "Credentials", "User", "Order"} <= set(components)
    assert components["Item"]["required"] == ["name", "price_cents", "id"]


async def test_the_docs_page_is_served(client):
    response = await client.get("/docs")
    assert response.status_code == 200
    assert "/openapi.json" in response.text


async def test_unknown_path_is_404(client):
    assert (await client.get("/nowhere")).status_code == 404


async def test_wrong_method_is_405(client):
    assert (await client.put("/items")).status_code == 405


def test_openapi_through_the_test_client(test_client):
    schema = test_client.get("/openapi.json").json()
    assert "/orders" in schema["paths"]


def test_health_through_the_test_client(test_client):
    assert test_client.get("/health").json() == {"ok": True}
