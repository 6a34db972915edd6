"""Overload: ten times what a model can serve; the queue bound holds and service recovers."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

pytestmark = pytest.mark.slow

SECONDS_PER_REQUEST = 0.05
CAPACITY = 1 / SECONDS_PER_REQUEST  # one worker: 20 requests a second
MAX_QUEUE = 8
PATH = "/v2/models/slow/infer"
_QUEUE = re.compile(r'^parallel_request_queue\{model="slow",version=""\} (\S+)$', re.M)


@pytest.fixture(scope="module")
def server(launch: Any, harness: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Any:
    repository = tmp_path_factory.mktemp("overload-repository")
    harness.write_model(
        repository,
        "slow",
        implementation="reliability_models.Slow",
        parallel_workers=1,
        max_queue_size=MAX_QUEUE,
        parameters={"seconds": SECONDS_PER_REQUEST},
    )
    return launch(repository)


def test_ten_times_capacity(
    server: Any, harness: ModuleType, profile: Any, figures: Any, tmp_path: Path
) -> None:
    body = harness.infer_body()
    overload = harness.Load(server.url, 30, 256)
    recovery = harness.Load(server.url, 30, 16)
    samples: dict[str, list[float]] = {"rss": [], "queue": []}

    async def sample(client: httpx.AsyncClient) -> None:
        while True:
            samples["rss"].append(server.rss_mb())
            metrics = (await client.get("/metrics")).text
            samples["queue"] += [float(v) for v in _QUEUE.findall(metrics)]
            await anyio.sleep(0.05)

    async def scenario() -> dict[str, float]:
        # Warm every path (answers and 503s) before the baseline is read.
        await harness.Load(server.url, 30, 256).open_loop(
            lambda _: ("warm", PATH, body), 10 * CAPACITY, 0.5
        )
        await anyio.sleep(0.3)
        baseline = server.rss_mb()
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(sample, client)
            started = time.monotonic()
            await overload.open_loop(
                lambda _: ("overload", PATH, body), 10 * CAPACITY, profile.overload_seconds
            )
            overload_time = time.monotonic() - started
            tg.cancel_scope.cancel()
        after = server.rss_mb()
        started = time.monotonic()
        await recovery.open_loop(
            lambda _: ("recovery", PATH, body), CAPACITY / 2, profile.recovery_seconds
        )
        recovery_time = time.monotonic() - started
        return {
            "baseline": baseline,
            "after": after,
            "overload_time": overload_time,
            "recovery_time": recovery_time,
        }

    measured = anyio.run(scenario)
    hot = overload.tallies["overload"]
    calm = recovery.tallies["recovery"]
    peak_rss = max(samples["rss"])
    peak_queue = max(samples["queue"])
    figures.add_tally(
        "overload",
        f"{10 * CAPACITY:g} req/s for {profile.overload_seconds:g} s at a model serving "
        f"{CAPACITY:g} req/s (1 worker, max_queue_size {MAX_QUEUE})",
        hot,
        None,
        f"served {hot.ok / measured['overload_time']:.0f} req/s; 503 with Retry-After: "
        f"{sum(hot.retry_after.values())}; queue peak {peak_queue:g}; server RSS "
        f"{measured['baseline']:.0f} MB before, {peak_rss:.0f} MB peak, "
        f"{measured['after']:.0f} MB after",
    )
    figures.add_tally(
        "overload",
        f"then {CAPACITY / 2:g} req/s for {profile.recovery_seconds:g} s",
        calm,
        None,
        f"served {calm.ok / measured['recovery_time']:.0f} req/s",
    )
    assert hot.lost == 0 and hot.refused == 0 and not hot.malformed
    assert set(hot.statuses) == {503}, hot.errors
    # Every refusal is the queue bound's, with a Retry-After the client can honour.
    assert sum(hot.retry_after.values()) == hot.statuses[503]
    assert set(hot.retry_after) <= {str(n) for n in range(1, 61)}
    assert set(hot.errors) == {"503 model 'slow' has N requests waiting for a worker"}
    assert hot.ok > 0 and hot.statuses[503] > hot.ok, "most of a 10x load is refused"
    assert samples["queue"] and peak_queue <= MAX_QUEUE
    assert peak_rss - measured["baseline"] < 64, samples["rss"]
    # Once the load drops, every request is served again.
    assert calm.ok == calm.sent > 0, calm
