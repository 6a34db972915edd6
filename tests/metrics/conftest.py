"""Scraping helpers: read ``/metrics`` back into numbers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import pytest

from tests.support import metric_values


class Samples:
    """Every sample of one scrape, looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values = metric_values(text)

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when it does not exist (yet)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.values

    def labels(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self.values if sample == name]


Scrape = Callable[..., Awaitable[Samples]]


async def _scrape(client: httpx.AsyncClient, path: str = "/metrics") -> Samples:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Samples(response.text)


@pytest.fixture
def scrape() -> Scrape:
    """``await scrape(client[, path])``: the app's metrics as ``Samples``."""
    return _scrape
