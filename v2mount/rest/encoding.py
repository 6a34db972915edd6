"""HTTP content codings: gzip and deflate request bodies in, compressed answers out.

tritonclient's ``request_compression_algorithm`` sends ``Content-Encoding: gzip`` (a gzip
member) or ``deflate`` (a zlib stream, as RFC 9110 means by it; a raw deflate stream is
accepted too); its ``response_compression_algorithm`` sends ``Accept-Encoding``. Request
bodies are inflated in bounded steps, so a small "zip bomb" can never allocate more than
the size limit before it is refused. Any other coding is refused with 415.
"""

from __future__ import annotations

import zlib

from v2mount.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding

__all__ = [
    "COMPRESS_MIN_BYTES",
    "Inflater",
    "compress",
    "response_coding",
]

#: Answers smaller than this go uncompressed whatever the client accepts: a few hundred
#: bytes gain little and the headers cost as much.
COMPRESS_MIN_BYTES = 1024

#: zlib's fastest level: most of the saving on tensor JSON for a fraction of the CPU.
COMPRESS_LEVEL = 1

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_STEP = 1024 * 1024


class Inflater:
    """Decompresses one request body of ``coding``, refusing output above ``limit`` bytes.

    ``run(budget)`` inflates at most ``budget`` more bytes (all that remains if ``None``)
    and says whether the body is complete, so a caller can do the first part on the
    event loop and hand the rest to a thread. ``BadRequest`` for a corrupt or truncated
    stream, ``PayloadTooLarge`` (413) past the limit. Not thread-safe; one thread at a time.
    """

    def __init__(self, body: bytes, coding: str, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self._wbits = _WBITS[coding]
        if coding == "deflate" and not _zlib_header(body):
            self._wbits = -zlib.MAX_WBITS  # a raw deflate stream, as some clients send
        self._inflater = zlib.decompressobj(self._wbits)
        self._pending = body
        self._parts: list[bytes] = []
        self._size = 0
        self.done = False

    def run(self, budget: int | None = None) -> bool:
        left = budget
        while not self.done and (left is None or left > 0):
            step = min(_STEP, self.limit + 1 - self._size)
            if left is not None:
                step = min(step, left)
            try:
                chunk = self._inflater.decompress(self._pending, step)
            except zlib.error as exc:
                raise BadRequest(f"request body is not valid {self.coding} data: {exc}") from None
            self._pending = self._inflater.unconsumed_tail
            self._size += len(chunk)
            if self._size > self.limit:
                raise PayloadTooLarge(
                    f"request body exceeds the {self.limit}-byte limit once decompressed"
                )
            self._parts.append(chunk)
            if left is not None:
                left -= len(chunk)
            if self._inflater.eof:
                self._next_member()
            elif not chunk and not self._pending:
                raise BadRequest(f"request body is truncated {self.coding} data")
        return self.done

    def _next_member(self) -> None:
        rest = self._inflater.unused_data
        if rest and self._wbits > 16:  # gzip allows several members back to back
            self._inflater = zlib.decompressobj(self._wbits)
            self._pending = rest
        elif rest:
            raise BadRequest(f"{len(rest)} bytes of data after the end of the {self.coding} body")
        else:
            self.done = True

    def result(self) -> bytes:
        assert self.done
        return self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)


def _zlib_header(body: bytes) -> bool:
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0


def request_coding(value: bytes | None) -> str | None:
    """The coding a request body needs undone (``None``: none); 415 for an unknown one."""
    if value is None:
        return None
    coding = value.decode("latin-1").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in _WBITS:
        raise UnsupportedEncoding(
            f"Content-Encoding {coding!r} is not supported; send gzip, deflate or identity"
        )
    return coding


def response_coding(accept: bytes | None) -> str | None:
    """The coding to answer with for an ``Accept-Encoding`` value: gzip, deflate or None.

    The acceptable coding with the highest q-value wins, gzip before deflate on a tie;
    ``*`` stands for gzip; ``q=0`` refuses a coding.
    """
    if not accept:
        return None
    best: tuple[float, int, str] | None = None
    for item in accept.decode("latin-1").lower().split(","):
        name, _, params = item.partition(";")
        name = name.strip()
        if name == "*":
            name = "gzip"
        if name not in ("gzip", "deflate"):
            continue
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                continue
        if quality <= 0:
            continue
        rank = (quality, 1 if name == "gzip" else 0, name)
        if best is None or rank > best:
            best = rank
    return None if best is None else best[2]


def compress(body: bytes, coding: str) -> bytes:
    """``body`` in ``coding`` (gzip or deflate, as ``response_coding`` chose)."""
    packer = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, _WBITS[coding])
    return packer.compress(body) + packer.flush()
