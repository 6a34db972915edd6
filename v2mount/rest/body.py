"""Reading a request body straight from ASGI ``receive``: size limit, content coding."""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from v2mount.errors import BadRequest, PayloadTooLarge
from v2mount.rest.encoding import Inflater, request_coding

__all__ = ["ClientDisconnect", "read_body", "request_body"]

#: Inflating beyond this many bytes continues in a worker thread, off the event loop.
INLINE_INFLATE_BYTES = 256 * 1024


async def read_body(
    receive: Receive,
    content_length: bytes | None,
    content_encoding: bytes | None,
    limit: int,
    limiter: anyio.CapacityLimiter | None = None,
) -> bytes:
    """The whole body, decoded from its ``Content-Encoding``.

    ``PayloadTooLarge`` (413) as soon as the body passes ``limit`` bytes on the wire or
    once inflated; ``UnsupportedEncoding`` (415) for a coding other than gzip, deflate,
    identity; ``ClientDisconnect`` if the client leaves first. The first 256 KiB of
    inflating run on the event loop, the rest in a thread of ``limiter``.
    """
    coding = request_coding(content_encoding)
    if content_length is not None:
        if not content_length.isdigit():
            raise BadRequest(f"invalid Content-Length {content_length.decode('latin-1')!r}")
        if int(content_length) > limit:
            raise PayloadTooLarge(
                f"request body of {int(content_length)} bytes exceeds the {limit}-byte limit"
            )
    message = await receive()
    if message["type"] != "http.request":
        raise ClientDisconnect()
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
    if message.get("more_body", False):
        chunks = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
    if coding is None:
        return body
    inflater = Inflater(body, coding, limit)
    if not inflater.run(INLINE_INFLATE_BYTES):
        await anyio.to_thread.run_sync(inflater.run, limiter=limiter)
    return inflater.result()


async def request_body(request: Request, limit: int) -> bytes:
    """``read_body`` for a Starlette ``Request``."""
    headers = request.headers
    length, coding = headers.get("content-length"), headers.get("content-encoding")
    return await read_body(
        request.receive,
        None if length is None else length.encode("latin-1"),
        None if coding is None else coding.encode("latin-1"),
        limit,
    )
