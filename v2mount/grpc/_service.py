"""The RPCs of ``inference.GRPCInferenceService``, over a ``V2App``'s registry.

Each RPC is a coroutine taking the parsed request message and returning the response
(a message, or for ``ModelInfer`` the serialised pieces). They run on the app's event
loop and go through the same functions as the REST routes: ``ModelHandle.infer``, the
app's repository and statistics methods. ``rpc_handlers`` wraps them for grpc.aio:
parsing (a message that does not parse is ``INVALID_ARGUMENT``), status codes from
``V2MountError.grpc_code``, and the ``grpc_server_*`` metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from anyio import to_thread
from google.protobuf.message import DecodeError, Message
from prometheus_client import Counter

from v2mount.errors import BadRequest, RepositoryDisabled, V2MountError
from v2mount.grpc._convert import (
    RawContents,
    decode_infer_request,
    encode_infer_response,
    parse_infer_request,
)
from v2mount.grpc.proto import grpc_predict_v2_pb2 as pb
from v2mount.grpc.proto import triton_extensions_pb2 as ext
from v2mount.metadata import model_metadata
from v2mount.metrics.app import AppMetrics

if TYPE_CHECKING:
    from v2mount.rest.app import V2App

__all__ = ["SERVICE", "InferenceService", "rpc_handlers"]

logger = logging.getLogger("v2mount")

SERVICE = "inference.GRPCInferenceService"
#: MLServer's older name for the repository RPCs (same messages on the wire).
LEGACY_REPOSITORY_SERVICE = "inference.model_repository.ModelRepositoryService"

#: Typed tensors above this many bytes are converted in a worker thread (as REST does).
THREAD_CODEC_BYTES = 256 * 1024

#: Runs a coroutine function on the app's event loop (the bridge under trio).
OnAppLoop = Callable[..., Awaitable[Any]]
Rpc = Callable[[Any], Awaitable[Any]]


def _duration(values: dict[str, int]) -> ext.StatisticDuration:
    return ext.StatisticDuration(count=values["count"], ns=values["ns"])


class InferenceService:
    """The RPC implementations (each called on the app's event loop)."""

    def __init__(self, app: V2App) -> None:
        self.app = app

    def rpcs(self) -> dict[str, tuple[type[Message], Rpc]]:
        """Method name → (request message class, implementation).

        ``ModelInfer``'s implementation takes what ``parse_infer_request`` returns.
        """
        return {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelInfer": (pb.ModelInferRequest, self.model_infer),
            "ModelStatistics": (ext.ModelStatisticsRequest, self.model_statistics),
            "RepositoryIndex": (ext.RepositoryIndexRequest, self.repository_index),
            "RepositoryModelLoad": (ext.RepositoryModelLoadRequest, self.repository_load),
            "RepositoryModelUnload": (ext.RepositoryModelUnloadRequest, self.repository_unload),
        }

    async def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=all(h.ready for h in self.app.registry.handles()))

    async def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        """Ready or not; an unknown model is not ready (Triton: no error, so that
        ``tritonclient``'s ``is_model_ready`` answers False as over REST)."""
        versions = self.app.registry.versions(request.name)
        if request.version:
            versions = [h for h in versions if h.version == request.version]
        elif versions:
            versions = [self.app.registry.get(request.name)]
        return pb.ModelReadyResponse(ready=bool(versions) and versions[0].ready)

    async def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        settings = self.app.settings
        return pb.ServerMetadataResponse(
            name=settings.server_name,
            version=settings.server_version,
            extensions=self.app.extensions(),
        )

    async def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        registry = self.app.registry
        handle = registry.get(request.name, request.version or None)
        versions = [h.version for h in registry.versions(handle.name) if h.version is not None]
        document = model_metadata(handle.settings, versions)
        return pb.ModelMetadataResponse(
            name=document["name"],
            versions=document.get("versions", []),
            platform=document["platform"],
            inputs=[_tensor_metadata(spec) for spec in document["inputs"]],
            outputs=[_tensor_metadata(spec) for spec in document["outputs"]],
        )

    async def model_infer(
        self, parsed: tuple[pb.ModelInferRequest, RawContents]
    ) -> list[bytes | memoryview]:
        request, raw = parsed
        handle = self.app.registry.get(request.model_name, request.model_version or None)
        limiter = self.app.codec_limiter
        started = time.perf_counter_ns()
        # Typed contents go element by element: a large tensor is converted in a thread.
        if not raw and _elements(request) * 4 > THREAD_CODEC_BYTES:
            payload = await to_thread.run_sync(decode_infer_request, request, raw, limiter=limiter)
        else:
            payload = decode_infer_request(request, raw)
        handle.stats.compute_input.add(time.perf_counter_ns() - started)
        response = await handle.infer(payload)
        encoding = time.perf_counter_ns()
        if not raw and any(t.data.nbytes > THREAD_CODEC_BYTES for t in response.outputs):
            pieces = await to_thread.run_sync(
                encode_infer_response, response, False, limiter=limiter
            )
        else:
            pieces = encode_infer_response(response, raw=bool(raw))
        handle.stats.compute_output.add(time.perf_counter_ns() - encoding)
        return pieces

    async def model_statistics(
        self, request: ext.ModelStatisticsRequest
    ) -> ext.ModelStatisticsResponse:
        entries = self.app.model_statistics(request.name or None, request.version or None)
        stats = []
        for entry in entries:
            inference = entry["inference_stats"]
            stats.append(
                ext.ModelStatistics(
                    name=entry["name"],
                    version=entry["version"],
                    last_inference=entry["last_inference"],
                    inference_count=entry["inference_count"],
                    execution_count=entry["execution_count"],
                    inference_stats=ext.InferStatistics(
                        **{key: _duration(value) for key, value in inference.items()}
                    ),
                )
            )
        return ext.ModelStatisticsResponse(model_stats=stats)

    def _require_repository(self) -> None:
        if not self.app.settings.repository_api_enabled:
            raise RepositoryDisabled("the model repository extension is disabled")

    async def repository_index(
        self, request: ext.RepositoryIndexRequest
    ) -> ext.RepositoryIndexResponse:
        self._require_repository()
        entries = self.app.repository_index()
        if request.ready:
            entries = [entry for entry in entries if entry["state"] == "READY"]
        return ext.RepositoryIndexResponse(
            models=[
                ext.RepositoryIndexResponse.ModelIndex(
                    name=entry["name"],
                    version=entry.get("version", ""),
                    state=entry["state"],
                    reason=entry["reason"],
                )
                for entry in entries
            ]
        )

    async def repository_load(
        self, request: ext.RepositoryModelLoadRequest
    ) -> ext.RepositoryModelLoadResponse:
        self._require_repository()
        await self.app.load_model(request.model_name)
        return ext.RepositoryModelLoadResponse()

    async def repository_unload(
        self, request: ext.RepositoryModelUnloadRequest
    ) -> ext.RepositoryModelUnloadResponse:
        self._require_repository()
        await self.app.unload_model(request.model_name)
        return ext.RepositoryModelUnloadResponse()


def _elements(request: pb.ModelInferRequest) -> int:
    return sum(math.prod(tensor.shape) for tensor in request.inputs)


def _tensor_metadata(spec: dict[str, Any]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec["name"], datatype=spec["datatype"], shape=spec["shape"]
    )


def _serialize(response: Any) -> bytes:
    if isinstance(response, list):
        return b"".join(response)
    assert isinstance(response, Message)
    return response.SerializeToString()


def rpc_handlers(
    service: InferenceService, on_app_loop: OnAppLoop | None
) -> list[grpc.GenericRpcHandler]:
    """grpc.aio handlers for every RPC, under Triton's and MLServer's service names.

    ``on_app_loop`` carries each call to the app's loop; ``None`` when the gRPC server
    runs on that loop already. Handlers take and return bytes: the request is parsed
    here so that a malformed one is answered ``INVALID_ARGUMENT``, not grpc's INTERNAL.
    """
    metrics = service.app.metrics
    built: dict[str, dict[str, grpc.RpcMethodHandler[bytes, bytes]]] = {
        SERVICE: {},
        LEGACY_REPOSITORY_SERVICE: {},
    }
    for method, (request_class, rpc) in service.rpcs().items():
        handler = _handler(SERVICE, method, request_class, rpc, on_app_loop, metrics)
        built[SERVICE][method] = handler
        if method.startswith("Repository"):
            built[LEGACY_REPOSITORY_SERVICE][method] = _handler(
                LEGACY_REPOSITORY_SERVICE, method, request_class, rpc, on_app_loop, metrics
            )
    return [grpc.method_handlers_generic_handler(name, table) for name, table in built.items()]


def _handler(
    service_name: str,
    method: str,
    request_class: type[Message],
    rpc: Rpc,
    on_app_loop: OnAppLoop | None,
    metrics: AppMetrics,
) -> grpc.RpcMethodHandler[bytes, bytes]:
    labels = ("UNARY", service_name, method)
    parse: Callable[[bytes], Any] = request_class.FromString
    if request_class is pb.ModelInferRequest:
        parse = parse_infer_request
    started = metrics.grpc_started.labels(*labels)
    duration = metrics.grpc_duration.labels(*labels)
    handled: dict[str, Counter] = {}

    async def call(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        started.inc()
        start = time.perf_counter()
        code = "OK"
        try:
            try:
                request = parse(data)
            except DecodeError as exc:
                raise BadRequest(f"malformed {request_class.__name__} message: {exc}") from None
            if on_app_loop is None:
                response = await rpc(request)
            else:
                response = await on_app_loop(rpc, request)
            return _serialize(response)
        except V2MountError as exc:
            code = exc.grpc_code
            if code == "INTERNAL":
                logger.warning("gRPC %s: %s", method, exc.message)
            await context.abort(getattr(grpc.StatusCode, code), exc.message)
            raise  # abort raises; this line only satisfies the type checker
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            logger.exception("unexpected error in gRPC %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            raise
        finally:
            counter = handled.get(code)
            if counter is None:
                counter = handled[code] = metrics.grpc_handled.labels(*labels, code)
            counter.inc()
            duration.observe(time.perf_counter() - start)

    return grpc.unary_unary_rpc_method_handler(call)
