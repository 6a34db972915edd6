"""OIP clients for tests: numpy arrays in, numpy arrays out, async or sync.

``AsyncV2Client`` speaks the protocol through any ``httpx.AsyncClient`` (in memory
through ``httpx.ASGITransport``, or over the network). ``V2Client`` offers the same
methods to synchronous code by running each call in an anyio blocking portal. Tensors
go as JSON by default, or with Triton's binary tensor extension when ``binary=True``;
BYTES tensors come back as numpy object arrays of ``bytes`` either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import orjson
from anyio.from_thread import BlockingPortal

from v2mount.codecs.binary import decode_binary_tensor, encode_binary_tensor
from v2mount.codecs.tensor import (
    array_to_datatype,
    datatype_to_dtype,
    decode_json_data,
    encode_json_data,
    to_output_array,
)
from v2mount.errors import V2MountError
from v2mount.types import Tensor

__all__ = ["AsyncV2Client", "InferResult", "V2Client", "V2HTTPError"]

HEADER_LENGTH = "inference-header-content-length"
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class V2HTTPError(Exception):
    """The server answered an OIP call with a status other than 200.

    ``error`` is the ``{"error": ...}`` text (or the raw body when it is not OIP JSON);
    ``response`` is the ``httpx.Response`` for anything else a test wants to check.
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.error = _error_text(response)
        super().__init__(
            f"{response.request.method} {response.request.url.path}: "
            f"{self.status_code} {self.error}"
        )


def _error_text(response: httpx.Response) -> str:
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text
    error = document.get("error") if isinstance(document, dict) else None
    return error if isinstance(error, str) else response.text


@dataclass(frozen=True)
class InferResult:
    """A decoded inference response; ``result["y"]`` is ``result.outputs["y"]``."""

    model_name: str
    model_version: str | None
    id: str | None
    outputs: dict[str, np.ndarray[Any, Any]]
    datatypes: dict[str, str]
    parameters: dict[str, Any] = field(default_factory=dict)
    response: httpx.Response | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self.outputs[name]


def _input_array(name: str, value: Any, declared: str | None) -> tuple[np.ndarray[Any, Any], str]:
    try:
        if isinstance(value, Tensor):
            data = value.data
            if value.datatype != "BYTES":
                data = np.asarray(data, dtype=datatype_to_dtype(value.datatype))
            return to_output_array(data, name), value.datatype
        array = to_output_array(value, name)
        if declared is not None and declared != "BYTES" and array.dtype.kind != "O":
            target = datatype_to_dtype(declared)
            if array.dtype != target and np.can_cast(array.dtype, target, "same_kind"):
                array = array.astype(target)
        return array, array_to_datatype(array)
    except V2MountError as exc:
        raise TypeError(f"input {name!r}: {exc.message}") from None


def _encode_request(
    inputs: Mapping[str, Any],
    *,
    outputs: Sequence[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    id: str | None = None,
    binary: bool = False,
    declared: Mapping[str, str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an inference request (JSON, or binary when asked).

    ``declared`` maps input names to the model's datatypes: arrays of another dtype of
    the same kind (float64 for FP32, int64 for INT32) are cast to them.
    """
    if not inputs:
        raise ValueError("an inference request needs at least one input")
    entries: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for name, value in inputs.items():
        array, datatype = _input_array(name, value, (declared or {}).get(name))
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunk = encode_binary_tensor(array)
            chunks.append(chunk)
            size = len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            entry["parameters"] = {"binary_data_size": size}
        else:
            try:
                entry["data"] = encode_json_data(array, name)
            except V2MountError as exc:
                raise ValueError(f"input {name!r}: {exc.message}") from None
        entries.append(entry)
    document: dict[str, Any] = {"inputs": entries}
    if id is not None:
        document["id"] = id
    request_parameters = dict(parameters or {})
    if binary:
        request_parameters["binary_data_output"] = True
    if request_parameters:
        document["parameters"] = request_parameters
    if outputs is not None:
        flag = {"parameters": {"binary_data": True}} if binary else {}
        document["outputs"] = [{"name": name, **flag} for name in outputs]
    header = orjson.dumps(document, option=_JSON_OPTIONS)
    if not chunks:
        return header, {"content-type": "application/json"}
    body = b"".join([header, *chunks])
    return body, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _decode_response(response: httpx.Response) -> InferResult:
    """Decode a 200 inference response (JSON or binary framing) into numpy arrays."""
    body = response.content
    length = response.headers.get(HEADER_LENGTH)
    offset = int(length) if length is not None else len(body)
    document = orjson.loads(body[:offset])
    view = memoryview(body)
    outputs: dict[str, np.ndarray[Any, Any]] = {}
    datatypes: dict[str, str] = {}
    for entry in document["outputs"]:
        name, datatype, shape = entry["name"], entry["datatype"], tuple(entry["shape"])
        where = f"output {name!r}"
        if "data" in entry:
            array = decode_json_data(entry["data"], datatype, shape, where)
        else:
            size = int(entry["parameters"]["binary_data_size"])
            array = decode_binary_tensor(view[offset : offset + size], datatype, shape, where)
            offset += size
            if not array.flags.writeable:
                array = array.copy()
        outputs[name] = array
        datatypes[name] = datatype
    return InferResult(
        model_name=document["model_name"],
        model_version=document.get("model_version"),
        id=document.get("id"),
        outputs=outputs,
        datatypes=datatypes,
        parameters=document.get("parameters") or {},
        response=response,
    )


def _model_path(model: str, version: str | None) -> str:
    path = f"/v2/models/{quote(model, safe='')}"
    return path if version is None else f"{path}/versions/{quote(version, safe='')}"


class AsyncV2Client:
    """An OIP client over an ``httpx.AsyncClient``; every path is under ``prefix``.

    Methods are coroutines for the event loop that owns ``http``; cancelling one
    cancels its HTTP request. OIP calls raise ``V2HTTPError`` on a non-200 answer;
    ``request``/``get``/``post`` return the raw ``httpx.Response`` whatever the status.
    """

    def __init__(self, http: httpx.AsyncClient, prefix: str = "") -> None:
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError(f"prefix {prefix!r} must start with '/' and not end with '/'")
        self.http = http
        self.prefix = prefix
        self._declared: dict[tuple[str, str | None], dict[str, str]] = {}

    def with_prefix(self, prefix: str) -> AsyncV2Client:
        """A client on the same connection for another mount point (``""``: the host)."""
        return AsyncV2Client(self.http, prefix)

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Any request, ``path`` relative to the prefix (``"/v2/models/m"``)."""
        return await self.http.request(method, self.prefix + path, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, **kwargs)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.request(method, path, **kwargs)
        if response.status_code != 200:
            raise V2HTTPError(response)
        return orjson.loads(response.content)

    async def live(self) -> bool:
        """``GET /v2/health/live`` answered 200."""
        return (await self.get("/v2/health/live")).status_code == 200

    async def ready(self, model: str | None = None, version: str | None = None) -> bool:
        """Server readiness, or one model's (``False`` for an unknown model)."""
        path = "/v2/health/ready" if model is None else _model_path(model, version) + "/ready"
        return (await self.get(path)).status_code == 200

    async def metadata(self, model: str | None = None, version: str | None = None) -> Any:
        """Server metadata, or a model's when ``model`` is given."""
        return await self._json("GET", "/v2" if model is None else _model_path(model, version))

    async def repository_index(self, ready: bool = False) -> Any:
        """The repository extension's index: a list of name/version/state/reason."""
        return await self._json("POST", "/v2/repository/index", json={"ready": ready})

    async def _declared_inputs(self, model: str, version: str | None) -> dict[str, str]:
        key = (model, version)
        if key not in self._declared:
            response = await self.get(_model_path(model, version))
            if response.status_code != 200:
                return {}
            specs = orjson.loads(response.content).get("inputs") or []
            self._declared[key] = {spec["name"]: spec["datatype"] for spec in specs}
        return self._declared[key]

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        id: str | None = None,
        binary: bool = False,
        cast: bool = True,
    ) -> InferResult:
        """Infer with numpy arrays (or array-likes, or ``Tensor`` for an explicit datatype).

        Each input's datatype follows its dtype (str and bytes arrays are BYTES). With
        ``cast``, an array whose dtype is of the same kind as the datatype the model
        declares is cast to it (``np.ones((2, 4))`` goes as FP32 to an FP32 input; the
        metadata is read once per model); a ``Tensor`` is sent as it is.
        ``binary=True`` sends and receives raw tensor bytes (the binary extension).
        """
        declared = await self._declared_inputs(model, version) if cast else None
        body, headers = _encode_request(
            inputs, outputs=outputs, parameters=parameters, id=id, binary=binary, declared=declared
        )
        # httpx asks for gzip by default; compressing tensors for a test client (in
        # memory or on loopback) would only cost CPU on both sides.
        headers["accept-encoding"] = "identity"
        response = await self.post(
            _model_path(model, version) + "/infer", content=body, headers=headers
        )
        if response.status_code != 200:
            raise V2HTTPError(response)
        return _decode_response(response)


class V2Client:
    """The blocking twin of ``AsyncV2Client``: each call runs in an anyio portal.

    Call it from any thread except the portal's own event loop (so not from inside an
    async test: use ``AsyncV2Client`` there). Calls are thread-safe.
    """

    def __init__(self, portal: BlockingPortal, client: AsyncV2Client) -> None:
        self.portal = portal
        self.aclient = client

    @property
    def prefix(self) -> str:
        return self.aclient.prefix

    def with_prefix(self, prefix: str) -> V2Client:
        """A client on the same connection for another mount point (``""``: the host)."""
        return V2Client(self.portal, self.aclient.with_prefix(prefix))

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Any request, ``path`` relative to the prefix; the raw response."""
        return self.portal.call(lambda: self.aclient.request(method, path, **kwargs))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def live(self) -> bool:
        return self.portal.call(self.aclient.live)

    def ready(self, model: str | None = None, version: str | None = None) -> bool:
        return self.portal.call(self.aclient.ready, model, version)

    def metadata(self, model: str | None = None, version: str | None = None) -> Any:
        return self.portal.call(self.aclient.metadata, model, version)

    def repository_index(self, ready: bool = False) -> Any:
        return self.portal.call(self.aclient.repository_index, ready)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        id: str | None = None,
        binary: bool = False,
        cast: bool = True,
    ) -> InferResult:
        """See ``AsyncV2Client.infer``."""
        return self.portal.call(
            lambda: self.aclient.infer(
                model,
                inputs,
                version=version,
                outputs=outputs,
                parameters=parameters,
                id=id,
                binary=binary,
                cast=cast,
            )
        )
