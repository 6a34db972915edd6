"""``tune`` serving a real model of known cost (``AppBench``), in process.

The model sleeps instead of computing, so its cost holds on a loaded machine: a sleep
takes no CPU and only ever lasts longer. The costs are chosen so that the physically
possible throughputs decide, by a wide margin, whatever the machine does:

- ``PerRow`` sleeps 20 ms per row: a batch is never cheaper per row, so no batcher can
  beat the 50 req/s of one call at a time, and only the thread hop it saves (well under
  the 10 ms per request that the +50 % of ``min_gain`` 0.5 would need) could make it
  look faster. Batching must stay off, and the reason say what predictive batching did.
- Its opposite, 20 ms per call whatever the rows (``Sleepy`` in ``test_cli.py``, where
  the whole command runs with these options, a pool too): unbatched, at most
  50 req/s; the fixed window (32 rows, 200 ms) never fills with 16 clients, so at most
  16 / 0.22 s = 73 req/s, under the 75 that ``min_gain`` 0.5 asks; the predictive
  batcher sends as soon as the model is free and keeps several rows per call (measured
  on a busy machine: 80-90 req/s at 2 clients, about 170 at 8, 280-340 at 16).

Only asyncio: ``python -m v2mount tune`` runs on asyncio (``test_bench.py`` covers the
bench on trio).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from v2mount import Model, Settings
from v2mount.tuning import TuneOptions, synthetic_request, tune
from v2mount.tuning._bench import AppBench
from v2mount.tuning._inputs import request_body
from v2mount.types import InferenceRequest

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

#: In process only (no pool start), 16 clients at most, 0.3 s steps: about 5 s a run.
OPTIONS = TuneOptions(
    latency_target_ms=300,
    duration=0.3,
    max_workers=0,
    max_concurrency=16,
    batch_sizes=(32,),
    batch_time=0.2,
    min_gain=0.5,
)


class PerRow(Model):
    name = "per_row"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]

    def predict(self, payload: InferenceRequest) -> Any:
        time.sleep(0.02 * payload["x"].shape[0])
        return {"y": payload["x"].sum(axis=1)}


def bench(model: Model) -> AppBench:
    body, request = request_body(synthetic_request(model.settings))
    return AppBench(model.settings, Settings(), body, request, warmup=0.3)


@pytest.mark.anyio
async def test_a_cost_per_row_keeps_batching_off_and_says_why() -> None:
    result = await tune(bench(PerRow()), OPTIONS)
    recommendation = result.recommendation
    assert recommendation.settings() == {
        "parallel_workers": 0,
        "max_batch_size": 0,
        "max_batch_time": 0.0,
        "batching": None,
    }
    predictive = result.sweeps[-1]
    assert predictive.config.predictive and predictive.steps  # it was measured
    reason = recommendation.reason
    assert "Predictive batching at best (in-process, predictive 32/SLO 240 ms) peaks at" in reason
    assert "Batching adds less than the 50% it must, so batching off." in reason
