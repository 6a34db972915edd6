"""docs/deploy/: the Dockerfile and manifests start the server this package really has.

No container runtime or cluster here: each file is parsed, its command line goes
through ``python -m v2mount``'s own parser and settings, and its ports, probes and
environment variables are checked against what the server answers and reads.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from v2mount import Model, V2App, V2Middleware
from v2mount.__main__ import build_parser, settings_overrides
from v2mount.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
DOCS_PAGE = DEPLOY.parent / "deploying.md"


class Nothing(Model):
    def predict(self, payload: Any) -> Any:
        return {}


def check_command(command: list[str], env: dict[str, str], public: bool = True) -> int:
    """The port the command serves on, once its flags and variables are known settings."""
    assert command[:3] == ["python", "-m", "v2mount"], command
    args = build_parser().parse_args(command[3:])
    settings = Settings(**settings_overrides(args))
    assert settings.host == "0.0.0.0" or not public  # a container must listen beyond loopback
    for name, value in env.items():
        if name.startswith("V2MOUNT_"):
            field = name.removeprefix("V2MOUNT_").lower()
            assert field in Settings.model_fields, name
            Settings.model_validate({field: value})
    return settings.http_port


def answered(path: str) -> bool:
    """Whether a V2App answers ``path`` (the middleware's own route test)."""
    middleware = V2Middleware(V2App([]), v2app=V2App([Nothing()]))
    return middleware.owns({"type": "http", "path": path, "root_path": ""})


def containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = document["spec"]
    if document["kind"] == "Deployment":
        spec = spec["template"]["spec"]
    return list(spec["containers"])


def test_the_dockerfile_runs_the_server_on_its_exposed_port() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    env = dict(re.findall(r"(V2MOUNT_\w+)=(\S+)", text))
    assert env == {"V2MOUNT_MODEL_REPOSITORY": "/models"}
    port = check_command(cmd, {})
    assert re.search(rf"^EXPOSE {port}$", text, re.MULTILINE)
    assert "python /models/iris/train.py" in text


MANIFESTS = sorted(p.name for p in DEPLOY.glob("*.yaml"))
SERVED = ("Deployment", "ServingRuntime", "ClusterServingRuntime")
RUNTIMES = ("ServingRuntime", "ClusterServingRuntime")
#: The model formats KServe may hand a v2mount runtime (as KServe's MLServer runtime does).
FORMATS = {"sklearn", "xgboost", "lightgbm", "onnx", "custom"}


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_start_the_server_and_probe_real_routes(name: str) -> None:
    documents = load(name)
    kinds = [document["kind"] for document in documents]
    served = [d for d in documents if d["kind"] in SERVED]
    assert len(served) == 1, kinds
    (container,) = containers(served[0])
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    port = check_command(container["args"], env)
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [port]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            get = container[probe]["httpGet"]
            assert answered(get["path"]), (probe, get["path"])
            assert get["port"] in (port, *ports), probe
    if served[0]["kind"] in RUNTIMES:
        runtime = served[0]
        assert runtime["spec"]["protocolVersions"] == ["v2"]
        assert "/mnt/models" in container["args"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        annotations = runtime["spec"]["annotations"]
        assert annotations["prometheus.kserve.io/port"] == str(port)
        assert annotations["prometheus.kserve.io/path"] == Settings().metrics_path
        assert env["V2MOUNT_GRPC_PORT"] == "9000"
        formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
        assert formats == FORMATS
        (service,) = [d for d in documents if d["kind"] == "InferenceService"]
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] == "v2"


def test_the_cluster_and_namespaced_runtimes_are_the_same_runtime() -> None:
    runtimes = {d["kind"]: d for name in MANIFESTS for d in load(name) if d["kind"] in RUNTIMES}
    assert set(runtimes) == set(RUNTIMES)
    cluster, namespaced = runtimes["ClusterServingRuntime"], runtimes["ServingRuntime"]
    assert cluster["spec"] == namespaced["spec"]
    assert cluster["metadata"]["name"] == namespaced["metadata"]["name"]


def test_the_deploying_page_shows_the_files_as_they_are() -> None:
    page = DOCS_PAGE.read_text()
    for name in ("Dockerfile", *MANIFESTS):
        assert f"deploy/{name}" in page, name
    commands = re.findall(r"^python -m v2mount .*$", page, re.MULTILINE)
    assert commands
    for line in commands:
        check_command(shlex.split(line.split("  #")[0]), {}, public=False)


def test_the_service_and_autoscaler_point_at_the_deployment() -> None:
    by_kind = {d["kind"]: d for d in load("kubernetes.yaml")}
    deployment = by_kind["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert by_kind["Service"]["spec"]["selector"].items() <= labels.items()
    target = by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (deployment["apiVersion"], "Deployment")
    assert target["name"] == deployment["metadata"]["name"]


def test_the_image_has_the_extras_the_manifests_turn_on() -> None:
    """The manifests run the image of docs/deploy/Dockerfile; gRPC needs its extra there."""
    text = (DEPLOY / "Dockerfile").read_text()
    (extras,) = re.findall(r"pip install [^\n]*'\.\[([\w,]+)\]'", text)
    variables = {
        item["name"]
        for name in MANIFESTS
        for document in load(name)
        if document["kind"] in SERVED
        for container in containers(document)
        for item in container.get("env", [])
    }
    assert "V2MOUNT_GRPC_PORT" in variables
    assert "grpc" in extras.split(",")
    images = {
        container["image"]
        for name in MANIFESTS
        for document in load(name)
        if document["kind"] in SERVED
        for container in containers(document)
    }
    assert images == {"registry.example.com/v2mount-example:0.1.0"}
