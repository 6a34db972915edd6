"""Open the Swagger pages in headless Chromium against a real uvicorn: the operations
render, and "Try it out" on a model's page runs the model through the mount prefix.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (CI installs them); without
them these tests fail, they do not skip. ``chromedriver`` is driven over its W3C WebDriver
HTTP API with httpx (no Selenium).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, uvicorn

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
]
#: The W3C WebDriver key of an element reference.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def _program(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return found
    pytest.fail(
        f"{names[0]} is required for this test and is not installed: "
        "apt-get update && apt-get install -y chromium chromium-driver"
    )


def chromium() -> str:
    return _program("chromium", "chromium-browser")


def chromedriver() -> str:
    return _program("chromedriver")


def live(address: str) -> bool:
    return httpx.get(f"http://{address}/v2/health/live").status_code == 200


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real uvicorn serving ``docs_server:create`` on 127.0.0.1; (base URL, its log)."""
    log = tmp_path_factory.mktemp("uvicorn") / "access.log"
    args = ["--factory", "docs_server:create", "--app-dir", str(HERE)]
    with uvicorn(args, log, live, within=30) as address:
        yield f"http://{address}", log


def rendered(url: str, profile: Path) -> tuple[list[str], list[str]]:
    """Load ``url`` in headless Chromium; the methods and paths of the rendered operations."""
    result = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            "--virtual-time-budget=20000",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
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
def test_server_docs_render_every_operation(server: tuple[str, Path], tmp_path: Path) -> None:
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
def test_model_docs_render_under_a_mount_prefix(server: tuple[str, Path], tmp_path: Path) -> None:
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


def _wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        assert process.poll() is None, f"{url} exited"
        try:
            httpx.get(url)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"{url} did not start")


class Browser:
    """A minimal W3C WebDriver client: one headless Chromium session."""

    def __init__(self, driver: str, profile: Path) -> None:
        self.http = httpx.Client(base_url=driver, timeout=60)
        options = {
            "binary": chromium(),
            "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"],
        }
        capabilities = {"browserName": "chrome", "goog:chromeOptions": options}
        answer = self.http.post("/session", json={"capabilities": {"alwaysMatch": capabilities}})
        assert answer.status_code == 200, answer.text
        self.session = f"/session/{answer.json()['value']['sessionId']}"
        self.http.post(self.session + "/timeouts", json={"implicit": 20000})

    def open(self, url: str) -> None:
        self.http.post(self.session + "/url", json={"url": url}).raise_for_status()

    def find(self, css: str) -> str:
        """The element matching ``css``, waiting for it to appear (implicit wait)."""
        answer = self.http.post(
            self.session + "/element", json={"using": "css selector", "value": css}
        )
        assert answer.status_code == 200, f"{css}: {answer.text[:500]}"
        element: str = answer.json()["value"][ELEMENT]
        return element

    def click(self, css: str) -> None:
        self.http.post(f"{self.session}/element/{self.find(css)}/click", json={})

    def text(self, css: str) -> str:
        value: str = self.http.get(f"{self.session}/element/{self.find(css)}/text").json()["value"]
        return value

    def close(self) -> None:
        self.http.delete(self.session)
        self.http.close()


@pytest.mark.slow
def test_try_it_out_runs_the_model_under_a_mount_prefix(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, log = server
    port = free_port()
    driver = subprocess.Popen(
        [chromedriver(), f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/status", driver)
        browser = Browser(f"http://127.0.0.1:{port}", tmp_path)
        try:
            browser.open(base + "/ml/v2/models/lin/docs")
            browser.click(".opblock-post .opblock-summary")  # expand POST .../infer
            browser.click(".opblock-post .execute")  # "Try it out" is on: send the example
            response = ".opblock-post .live-responses-table .response"
            status = browser.text(response + " .response-col_status")
            url = browser.text(".opblock-post .request-url pre")
            answer = browser.text(response + " .response-col_description pre")
        finally:
            browser.close()
    finally:
        driver.terminate()
        driver.wait(15)
    assert status == "200"
    assert url == base + "/ml/v2/models/lin/infer"
    assert '"model_name": "lin"' in answer
    assert '"POST /ml/v2/models/lin/infer HTTP/1.1" 200' in log.read_text()
