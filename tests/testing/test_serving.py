"""``run_lifespan`` and ``serve``: a host's lifespan run as a server runs it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from v2mount.testing import LifespanError, run_lifespan, serve

pytestmark = pytest.mark.anyio


def greeting_app() -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {"greeting": "hello from the lifespan"}

    async def greet(request: Request) -> Response:
        return PlainTextResponse(request.state.greeting)

    return Starlette(routes=[Route("/", greet)], lifespan=lifespan)


async def test_the_lifespan_state_is_yielded() -> None:
    async with run_lifespan(greeting_app()) as state:
        assert state == {"greeting": "hello from the lifespan"}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_lifespan_state_reaches_each_request(backend: str) -> None:
    with serve(greeting_app(), wait_ready=False, backend=backend) as client:
        assert client.get("/").text == "hello from the lifespan"


async def test_a_start_up_error_is_raised_as_itself() -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise KeyError("no database")
        yield

    with pytest.raises(KeyError, match="no database"):
        async with run_lifespan(Starlette(lifespan=lifespan)):
            pytest.fail("the block must not run")


async def test_an_app_that_raises_at_once_is_reported() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError(f"no {scope['type']} here")

    with pytest.raises(ValueError, match="no lifespan here"):
        async with run_lifespan(app):
            pytest.fail("the block must not run")


@pytest.mark.parametrize(
    ("messages", "text"),
    [
        ([{"type": "lifespan.startup.failed", "message": "no disk"}], "startup failed: no disk"),
        ([], r"startup failed: \(the app returned\)"),
        ([{"type": "lifespan.startup.complete"}], r"shutdown failed: \(the app returned\)"),
    ],
)
async def test_failures_the_app_reports_are_lifespan_errors(
    messages: list[dict[str, Any]], text: str
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        for message in messages:
            await send(message)

    with pytest.raises(LifespanError, match=text):
        async with run_lifespan(app):
            pass


async def test_an_error_in_the_block_comes_out_as_itself_after_shutdown() -> None:
    stopped: list[bool] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        stopped.append(True)

    with pytest.raises(ZeroDivisionError):
        async with run_lifespan(Starlette(lifespan=lifespan)):
            1 / 0  # noqa: B018
    assert stopped == [True]
