"""``python -m v2mount --repository examples/models`` under a real uvicorn on loopback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support import alive, descendants, free_port
from v2mount.testing import connect


@pytest.mark.slow
def test_serves_the_example_repository_and_leaves_no_process_behind(
    models: Path, tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    command = [sys.executable, "-m", "v2mount", "--repository", str(models), "--port", str(port)]
    server = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        with connect(f"http://127.0.0.1:{port}") as client:
            while True:
                try:
                    if client.ready():
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the server did not become ready:\n{log.read()}")
                time.sleep(0.1)
            result = client.infer("iris", {"features": [[6.7, 3.0, 5.2, 2.3]]}, binary=True)
            assert result["predict"].tolist() == [[2]]
            scores = client.infer("anomaly", {"readings": np.ones((2, 3))})["score"]
            assert scores.dtype == np.float32 and scores.shape == (2,)
            workers = descendants(server.pid)
            assert workers, "iris runs in a worker process"
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
        log.seek(0)
        assert "Application shutdown complete." in log.read()
        # Workers are stopped before uvicorn exits; the resource tracker follows on EOF.
        deadline = time.monotonic() + 10
        while {pid for pid in workers if alive(pid)} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {pid for pid in workers if alive(pid)} == set()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
