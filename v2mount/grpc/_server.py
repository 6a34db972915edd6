"""``GrpcServer``: a ``V2App``'s gRPC service on a port of its own, started and stopped
with the app.

gRPC speaks HTTP/2 with trailers, which an ASGI server does not carry, so it cannot be
mounted in the host: grpc.aio listens on ``settings.grpc_port`` beside it. On an
asyncio host it runs on the host's own loop (no thread hop per call). On a trio host
it gets an asyncio loop in a thread of its own, and each call runs on the trio loop
through ``TrioLoop`` (``_bridge.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import grpc
import sniffio

from v2mount.errors import SettingsError
from v2mount.grpc._service import InferenceService, OnAppLoop, rpc_handlers

if TYPE_CHECKING:
    from v2mount.rest.app import V2App

__all__ = ["GrpcServer"]

logger = logging.getLogger("v2mount")


def _read(path: Any, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise SettingsError(f"cannot read {what} {path}: {exc.strerror}") from None


class GrpcServer:
    """The gRPC server of one ``V2App`` (``app.grpc`` when ``grpc_port`` is set).

    ``start`` binds the port (``SettingsError`` if it cannot) and serves; ``port`` is
    the bound port (useful with ``grpc_port=0``). ``stop`` lets in-flight calls finish
    for ``grpc_shutdown_grace`` seconds, cancels the rest, and is idempotent. Both are
    called on the app's event loop (asyncio or trio) and shielded by the app.
    """

    def __init__(self, app: V2App) -> None:
        self.app = app
        self.port: int | None = None
        self._service = InferenceService(app)
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._stopped: concurrent.futures.Future[None] | None = None

    @property
    def address(self) -> str:
        """``host:port`` as bound (IPv6 hosts bracketed)."""
        host = self.app.settings.grpc_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port if self.port is not None else self.app.settings.grpc_port}"

    def _credentials(self) -> grpc.ServerCredentials | None:
        settings = self.app.settings
        if settings.grpc_ssl_certfile is None and settings.grpc_ssl_keyfile is None:
            if settings.grpc_ssl_ca_certs is not None:
                raise SettingsError(
                    "grpc_ssl_ca_certs needs grpc_ssl_certfile and grpc_ssl_keyfile"
                )
            return None
        if settings.grpc_ssl_certfile is None or settings.grpc_ssl_keyfile is None:
            raise SettingsError("gRPC TLS needs both grpc_ssl_certfile and grpc_ssl_keyfile")
        pair = (
            _read(settings.grpc_ssl_keyfile, "grpc_ssl_keyfile"),
            _read(settings.grpc_ssl_certfile, "grpc_ssl_certfile"),
        )
        roots = None
        if settings.grpc_ssl_ca_certs is not None:
            roots = _read(settings.grpc_ssl_ca_certs, "grpc_ssl_ca_certs")
        return grpc.ssl_server_credentials(
            [pair], root_certificates=roots, require_client_auth=roots is not None
        )

    async def _create(self, on_app_loop: OnAppLoop | None) -> grpc.aio.Server:
        """Build, bind and start the server on the running asyncio loop."""
        settings = self.app.settings
        limit = settings.grpc_max_message_length or settings.max_request_bytes
        server = grpc.aio.server(
            handlers=rpc_handlers(self._service, on_app_loop),
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                # grpcio's default (1) lets any second server share the port unnoticed.
                ("grpc.so_reuseport", int(settings.grpc_reuse_port)),
            ],
        )
        credentials = self._credentials()
        try:
            if credentials is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, credentials)
        except RuntimeError as exc:
            raise SettingsError(f"gRPC cannot listen on {self.address}: {exc}") from None
        await server.start()
        self.port = port
        self._server = server
        return server

    async def start(self) -> None:
        if self._server is not None:
            return
        if sniffio.current_async_library() == "asyncio":
            await self._create(None)
        else:
            await self._start_thread()
        logger.info("gRPC server listening on %s", self.address)

    async def _start_thread(self) -> None:
        from v2mount.grpc._bridge import TrioLoop

        app_loop = TrioLoop.current()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopped = concurrent.futures.Future()

        async def serve() -> None:
            self._thread_loop = asyncio.get_running_loop()
            self._stop_requested = asyncio.Event()
            try:
                server = await self._create(app_loop.call)
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(None)
            await self._stop_requested.wait()
            await server.stop(self.app.settings.grpc_shutdown_grace)

        def run() -> None:
            try:
                asyncio.run(serve())
            finally:
                assert self._stopped is not None
                self._stopped.set_result(None)

        self._thread = threading.Thread(target=run, name="v2mount-grpc", daemon=True)
        self._thread.start()
        try:
            await anyio.to_thread.run_sync(started.result)
        except BaseException:
            await anyio.to_thread.run_sync(self._thread.join)
            self._thread = None
            raise

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if self._thread is None:
            await server.stop(self.app.settings.grpc_shutdown_grace)
        else:
            assert self._thread_loop is not None and self._stop_requested is not None
            assert self._stopped is not None
            self._thread_loop.call_soon_threadsafe(self._stop_requested.set)
            await anyio.to_thread.run_sync(self._stopped.result)
            await anyio.to_thread.run_sync(self._thread.join)
            self._thread = None
        logger.info("gRPC server on %s stopped", self.address)
        self.port = None
