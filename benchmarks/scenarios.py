"""The benchmark scenarios: which servers to stand up, with which models, and what to send.

A ``Setup`` is one pair of servers (v2mount and MLServer) configured alike; its ``Case``s
are the measured points run against both while they are up, interleaved. Request bodies
are written once into the work folder and reused by every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

__all__ = [
    "Case",
    "ModelSpec",
    "Payload",
    "Setup",
    "all_setups",
    "write_payloads",
    "write_repositories",
]

TINY_CONCURRENCY = (1, 16, 64)
HEAVY_CONCURRENCY = 4
BATCH_CONCURRENCY = 64
BATCH_SIZE = 32
BATCH_TIME_S = 0.005
ECHO_ELEMENTS = 1_000_000


@dataclass(frozen=True)
class Payload:
    """A request body on disk plus the headers that go with it."""

    path: Path
    headers: dict[str, str]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: str  # class name, the same in bench_v2mount and bench_mlserver
    weights: str | None  # key of ``bench_core.write_weights``'s result
    max_batch_size: int = 0
    max_batch_time: float = 0.0


@dataclass(frozen=True)
class Case:
    """One measured point: a model, a body and a fixed concurrency.

    ``servers`` lists who runs it (the binary extension is v2mount only); a case with
    ``baseline`` set takes its MLServer figures from that case, for the ratio.
    """

    key: str
    scenario: str
    label: str
    model: str
    payload: str
    concurrency: int
    servers: tuple[str, ...] = ("v2mount", "mlserver")
    baseline: str | None = None
    #: ``http`` (wrk or the asyncio client) or ``grpc`` (``grpc_loadgen``, ModelInfer).
    protocol: str = "http"


@dataclass(frozen=True)
class Setup:
    key: str
    title: str
    parallel_workers: int
    models: tuple[ModelSpec, ...]
    cases: tuple[Case, ...] = ()
    measure_memory: bool = False
    #: Extra environment of the v2mount server (``V2MOUNT_*`` settings).
    v2mount_env: tuple[tuple[str, str], ...] = ()


def all_setups() -> list[Setup]:
    """Every setup, in the order the run goes through them."""
    tiny = ModelSpec("tiny", "TinyModel", "tiny")
    setups = []
    for workers in (0, 2):
        where = "in-process" if workers == 0 else f"pool of {workers}"
        cases = tuple(
            Case(f"tiny-pw{workers}-c{c}", "1 tiny model", f"{where}, c={c}", "tiny", "tiny", c)
            for c in TINY_CONCURRENCY
        )
        setups.append(Setup(f"tiny-pw{workers}", f"tiny model, {where}", workers, (tiny,), cases))
    heavy = ModelSpec("heavy", "HeavyModel", "heavy")
    for workers in (1, 2):
        case = Case(
            f"heavy-pw{workers}",
            "2 CPU-heavy model",
            f"{workers} worker{'s' if workers > 1 else ''}, c={HEAVY_CONCURRENCY}",
            "heavy",
            "heavy",
            HEAVY_CONCURRENCY,
        )
        setups.append(Setup(f"heavy-pw{workers}", case.label, workers, (heavy,), (case,)))
    for batching in (False, True):
        name = "on" if batching else "off"
        vector = ModelSpec(
            "vector",
            "VectorModel",
            "vector",
            max_batch_size=BATCH_SIZE if batching else 0,
            max_batch_time=BATCH_TIME_S if batching else 0.0,
        )
        detail = f" ({BATCH_SIZE} rows / {BATCH_TIME_S * 1e3:g} ms)" if batching else ""
        case = Case(
            f"batch-{name}",
            "3 adaptive batching",
            f"batching {name}{detail}, in-process, c={BATCH_CONCURRENCY}",
            "vector",
            "vector",
            BATCH_CONCURRENCY,
        )
        setups.append(Setup(f"batch-{name}", case.label, 0, (vector,), (case,)))
    echo = ModelSpec("echo", "EchoModel", None)
    for workers in (0, 2):
        where = "in-process" if workers == 0 else f"pool of {workers}"
        json_case = Case(
            f"echo-pw{workers}-json",
            "4 1M FP32 round trip",
            f"JSON, {where}, c=1",
            "echo",
            "echo-json",
            1,
        )
        binary_case = Case(
            f"echo-pw{workers}-binary",
            "4 1M FP32 round trip",
            f"binary (v2mount) vs JSON (MLServer), {where}, c=1",
            "echo",
            "echo-binary",
            1,
            servers=("v2mount",),
            baseline=json_case.key,
        )
        setups.append(
            Setup(
                f"echo-pw{workers}", f"1M FP32, {where}", workers, (echo,), (json_case, binary_case)
            )
        )
    setups += grpc_setups(tiny, echo)
    for workers in (0, 2):
        where = "in-process" if workers == 0 else f"pool of {workers}"
        models = tuple(ModelSpec(f"tiny-{c}", "TinyModel", "tiny") for c in "abc")
        setups.append(
            Setup(
                f"memory-pw{workers}",
                f"3 tiny models, {where}",
                workers,
                models,
                measure_memory=True,
            )
        )
    # MLServer's workers load every model (one inference pool); v2mount's do in a shared pool.
    setups.append(
        Setup(
            "memory-shared-pw2",
            "3 tiny models, one shared pool of 2",
            2,
            models,
            measure_memory=True,
            v2mount_env=(("V2MOUNT_DEFAULT_POOL", "shared"),),
        )
    )
    return setups


def grpc_setups(tiny: ModelSpec, echo: ModelSpec) -> list[Setup]:
    """Scenario 6: both servers' own gRPC servers (``ModelInfer``, raw contents)."""
    scenario = "6 gRPC"
    tiny_cases = tuple(
        Case(
            f"grpc-tiny-c{c}",
            scenario,
            f"tiny model, in-process, c={c}",
            "tiny",
            "tiny-grpc",
            c,
            protocol="grpc",
        )
        for c in TINY_CONCURRENCY
    )
    echo_grpc = Case(
        "grpc-echo",
        scenario,
        "1M FP32 raw contents, in-process, c=1",
        "echo",
        "echo-grpc",
        1,
        protocol="grpc",
    )
    echo_rest = Case(
        "grpc-echo-rest-binary",
        scenario,
        "1M FP32: v2mount binary REST vs MLServer gRPC, in-process, c=1",
        "echo",
        "echo-binary",
        1,
        servers=("v2mount",),
        baseline=echo_grpc.key,
    )
    return [
        Setup("grpc-tiny", "tiny model over gRPC, in-process", 0, (tiny,), tiny_cases),
        Setup("grpc-echo", "1M FP32 over gRPC, in-process", 0, (echo,), (echo_grpc, echo_rest)),
    ]


def _grpc_body(model: str, name: str, array: np.ndarray) -> bytes:
    """A serialised ModelInferRequest carrying ``array`` as raw_input_contents."""
    from v2mount.grpc.proto import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(array.astype("<f4").tobytes())
    return request.SerializeToString()


def _json_body(name: str, array: np.ndarray) -> bytes:
    request = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": "FP32",
                "data": array.reshape(-1),
            }
        ]
    }
    return orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)


def write_payloads(folder: Path) -> dict[str, Payload]:
    """Write every request body (deterministic data) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    json_headers = {"Content-Type": "application/json"}
    bodies = {
        "tiny": _json_body("x", np.array([[5.9, 3.0, 5.1, 1.8]], dtype=np.float32)),
        "heavy": _json_body("x", np.array([[0.5, 1.5, 2.5, 3.5]], dtype=np.float32)),
        "vector": _json_body("x", rng.standard_normal((1, 64), dtype=np.float32)),
    }
    echo = rng.random(ECHO_ELEMENTS, dtype=np.float32)
    bodies["echo-json"] = _json_body("x", echo)
    payloads = {}
    for key, body in bodies.items():
        path = folder / f"{key}.json"
        path.write_bytes(body)
        payloads[key] = Payload(path, json_headers)
    grpc_bodies = {
        "tiny-grpc": _grpc_body("tiny", "x", np.array([[5.9, 3.0, 5.1, 1.8]], dtype=np.float32)),
        "echo-grpc": _grpc_body("echo", "x", echo),
    }
    for key, body in grpc_bodies.items():
        path = folder / f"{key}.pb"
        path.write_bytes(body)
        payloads[key] = Payload(path, {})
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [ECHO_ELEMENTS],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": echo.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    path = folder / "echo-binary.bin"
    path.write_bytes(header + echo.astype("<f4").tobytes())
    payloads["echo-binary"] = Payload(
        path,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    return payloads


def write_repositories(setup: Setup, root: Path, weights: dict[str, Path]) -> dict[str, Path]:
    """Write the v2mount and the MLServer model repository of ``setup`` under ``root``.

    Both use the same ``model-settings.json`` fields and the same weight files; only
    ``implementation`` differs. MLServer takes ``parallel_workers`` from its server-wide
    ``settings.json`` (written when it starts), v2mount from each model's settings.
    """
    repos = {}
    for server, module in (("v2mount", "bench_v2mount"), ("mlserver", "bench_mlserver")):
        repo = root / setup.key / server
        for spec in setup.models:
            folder = repo / spec.name
            folder.mkdir(parents=True, exist_ok=True)
            settings: dict[str, object] = {
                "name": spec.name,
                "implementation": f"{module}.{spec.cls}",
                "max_batch_size": spec.max_batch_size,
                "max_batch_time": spec.max_batch_time,
            }
            if spec.weights is not None:
                settings["parameters"] = {"uri": str(weights[spec.weights])}
            if server == "v2mount":
                settings["parallel_workers"] = setup.parallel_workers
            (folder / "model-settings.json").write_text(json.dumps(settings, indent=2))
        repos[server] = repo
    return repos
