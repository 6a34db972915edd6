"""Open the Swagger pages in headless Chromium against a real uvicorn: operations render.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (CI installs them); without
a browser this test fails, it does not skip.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).parent

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "headless Chromium is required for this test and is not installed: "
            "apt-get update && apt-get install -y chromium chromium-driver"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real uvicorn serving ``docs_server:create`` on 127.0.0.1; (base URL, its log)."""
    port = free_port()
    log = tmp_path_factory.mktemp("uvicorn") / "access.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "--factory", "docs_server:create",
                "--app-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if process.poll() is not None:
                pytest.fail(f"uvicorn exited: {log.read_text()}")
            try:
                if httpx.get(base + "/v2/health/live").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail(f"uvicorn did not start: {log.read_text()}")
        yield base, log
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rendered(url: str, profile: Path) -> tuple[list[str], list[str]]:
    """Load ``url`` in headless Chromium; the methods and paths of the rendered operations."""
    result = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    methods = re.findall(r'class="opblock opblock-(\w+)', dom)
    paths = re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom)
    return methods, paths


def operations(url: str) -> tuple[list[str], set[str]]:
    document = httpx.get(url).json()
    methods = [method for item in document["paths"].values() for method in item]
    return sorted(methods), set(document["paths"])


@pytest.mark.slow
def test_server_docs_render_every_operation(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, log = server
    methods, paths = rendered(base + "/v2/docs", tmp_path)
    expected_methods, expected_paths = operations(base + "/v2/docs/openapi.json")
    assert sorted(methods) == expected_methods
    assert set(paths) == expected_paths
    assert "/v2/models/{name}/versions/{version}/infer" in paths
    requested = log.read_text()
    assert '"GET /v2/docs/static/swagger-ui-bundle.js HTTP/1.1" 200' in requested
    assert '"GET /v2/docs/openapi.json HTTP/1.1" 200' in requested


@pytest.mark.slow
def test_model_docs_render_under_a_mount_prefix(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, log = server
    methods, paths = rendered(base + "/ml/v2/models/lin/docs", tmp_path)
    assert sorted(methods) == ["get", "get", "get", "post"]
    assert set(paths) == {
        "/v2/models/lin",
        "/v2/models/lin/ready",
        "/v2/models/lin/stats",
        "/v2/models/lin/infer",
    }
    requested = log.read_text()
    assert '"GET /ml/v2/docs/static/swagger-ui-bundle.js HTTP/1.1" 200' in requested
    assert '"GET /ml/v2/models/lin/docs/openapi.json HTTP/1.1" 200' in requested
