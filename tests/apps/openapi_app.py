"""A FastAPI app whose first ``/openapi.json`` blocks the loop in library code only: the schema
of many nested pydantic models is built on the loop (no frame of the app's own runs)."""

from fastapi import FastAPI
from pydantic import BaseModel, create_model

from poolwatch import instrument

ROUTES = 60

app = FastAPI()


class Address(BaseModel):
    street: str
    city: str
    zip: str | None = None


def _route(n: int) -> None:
    item = create_model(f"Item{n}", name=(str, ...), price=(float, 0.0), tags=(list[str], []))
    order = create_model(
        f"Order{n}",
        id=(int, ...),
        items=(list[item], []),  # type: ignore[valid-type]
        ship_to=(Address, ...),
        notes=(dict[str, list[int]], {}),
    )

    async def endpoint(body: order) -> order:  # type: ignore[valid-type]
        return body

    app.post(f"/orders{n}/{{order_id}}", response_model=order)(endpoint)


for n in range(ROUTES):
    _route(n)

instrument(app)
