"""Shared pools: several models (``"pool": "<name>"``) served by one set of workers.

Each test stands a repository up behind a real ``V2App`` on asyncio and trio, and waits
on what the pool reports (``SharedPool.loaded``, statistics), never on time.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.support import eventually
from v2mount import V2App
from v2mount.errors import SettingsError
from v2mount.pool import SharedPool
from v2mount.registry import effective_settings
from v2mount.settings import ModelSettings, Settings, load_settings

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve().parent


def repository(root: Path, models: dict[str, dict[str, Any]], **common: Any) -> Path:
    """A model repository: one ``model-settings.json`` per folder of ``models``."""
    for folder, document in models.items():
        path = root / folder
        path.mkdir(parents=True)
        (path / "model-settings.json").write_text(json.dumps({**common, **document}))
    return root


@pytest.fixture
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``shared_models`` importable by name, here and in workers."""
    monkeypatch.syspath_prepend(str(HERE))


def scale(factor: float) -> dict[str, Any]:
    return {"implementation": "shared_models.Scale", "parameters": {"factor": factor}}


async def infer(
    client: httpx.AsyncClient, model: str, x: float = 1.0, version: str | None = None, **params: Any
) -> httpx.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [x]}],
        "parameters": params,
    }
    return await client.post(path, json=body)


def output(response: httpx.Response, name: str) -> list[Any]:
    outputs = response.json()["outputs"]
    return next(o["data"] for o in outputs if o["name"] == name)


def shared(app: V2App, name: str = "shared") -> SharedPool:
    assert app.registry.pools is not None
    pool = app.registry.pools.get(name)
    assert pool is not None
    return pool


def whole(pool: SharedPool, models: set[str], workers: int = 2) -> bool:
    """``workers`` serving workers, each with exactly ``models`` loaded."""
    loaded = pool.loaded()
    return len(loaded) == workers and all(names == models for names in loaded.values())


async def census(client: httpx.AsyncClient, pids: set[int]) -> dict[int, int]:
    """``Heavy`` models alive in each worker: slow requests in pairs until each answered."""
    seen: dict[int, int] = {}

    async def ask() -> None:
        response = await infer(client, "census", seconds=0.2)
        assert response.status_code == 200, response.text
        seen[output(response, "pid")[0]] = output(response, "live")[0]

    with anyio.fail_after(60):
        while set(seen) != pids:
            async with anyio.create_task_group() as group:
                for _ in pids:
                    group.start_soon(ask)
    return seen


# -- serving -------------------------------------------------------------------------


async def test_models_of_one_pool_share_its_workers_and_answer_concurrently(
    serve: Any, tmp_path: Path, importable: None
) -> None:
    factors = {("a", None): 2, ("b", None): 3, ("v", "1"): 10, ("v", "2"): 20}
    models = {"a": scale(2), "b": scale(3), "v/1": scale(10), "v/2": scale(20)}
    app = V2App(repository=repository(tmp_path, models, pool="shared", parallel_workers=2))
    async with serve(app) as client:
        pool = shared(app)
        pids = set(pool.pids())
        assert len(pids) == 2  # two workers for four model versions
        assert pool.loaded() == {pid: {"a", "b", "v:1", "v:2"} for pid in pids}
        answers: dict[tuple[str, str | None, int], httpx.Response] = {}

        async def ask(model: str, version: str | None, x: int) -> None:
            answers[model, version, x] = await infer(client, model, x, version, seconds=0.02)

        async with anyio.create_task_group() as group:
            for x in range(6):
                for model, version in factors:
                    group.start_soon(ask, model, version, x)
        for (model, version, x), response in answers.items():
            assert response.status_code == 200, response.text
            assert output(response, "y") == [x * factors[model, version]]
        # Least-loaded dispatch: the first two requests took both idle workers.
        assert {output(r, "pid")[0] for r in answers.values()} == pids
        stats = (await client.get("/v2/models/a/stats")).json()["model_stats"]
        assert stats[0]["inference_stats"]["success"]["count"] == 6
        for name in ("a", "b", "v"):
            assert (await client.get(f"/v2/models/{name}/ready")).status_code == 200
        statistics = app.registry.get("b").runner_statistics()
        assert statistics is not None and statistics.workers == statistics.live_workers == 2


async def test_stage_calls_reach_their_model_in_a_shared_pool(
    serve: Any, tmp_path: Path, importable: None
) -> None:
    staged = {"implementation": "shared_models.Staged"}
    models = {
        "a": scale(2),
        "piped": {**staged, "parameters": {"offset": 1}},  # one trip: preprocess → postprocess
        "batched": {  # preprocess, a batched predict, postprocess: three calls
            **staged,
            "parameters": {"offset": 2},
            "max_batch_size": 4,
            "max_batch_time": 0.01,
        },
    }
    app = V2App(repository=repository(tmp_path, models, pool="shared", parallel_workers=2))
    async with serve(app) as client:
        answers: dict[tuple[str, int], httpx.Response] = {}

        async def ask(model: str, x: int) -> None:
            answers[model, x] = await infer(client, model, x)

        async with anyio.create_task_group() as group:
            for x in range(5):
                for model in ("a", "piped", "batched"):
                    group.start_soon(ask, model, x)
        expected = {"a": lambda x: 2 * x, "piped": lambda x: 10 * x + 1}
        expected["batched"] = lambda x: 10 * x + 2
        for (model, x), response in answers.items():
            assert response.status_code == 200, response.text
            assert output(response, "y") == [expected[model](x)]


async def test_queues_and_metrics_are_counted_per_model(
    serve: Any, tmp_path: Path, importable: None
) -> None:
    app = V2App(
        repository=repository(
            tmp_path, {"a": scale(2), "b": scale(3)}, pool="shared", parallel_workers=1
        )
    )
    release = tmp_path / "release"
    async with serve(app) as client:
        answers: list[httpx.Response] = []

        async def ask(model: str) -> None:
            answers.append(await infer(client, model, until=str(release)))

        def statistics(model: str) -> Any:
            return app.registry.get(model).runner_statistics()

        async with anyio.create_task_group() as group:
            group.start_soon(ask, "a")  # holds the one worker until the test releases it
            await eventually(
                lambda: statistics("a").in_flight == 1, explain=lambda: statistics("a")
            )
            for model in ("b", "b", "a"):
                group.start_soon(ask, model)
            await eventually(
                lambda: statistics("b").queued == 2 and statistics("a").queued == 1,
                explain=lambda: (statistics("a"), statistics("b")),
            )
            assert statistics("a").in_flight == 2 and statistics("b").in_flight == 2
            text = (await client.get("/metrics")).text
            assert 'parallel_request_queue{model="a",version=""} 1.0' in text
            assert 'parallel_request_queue{model="b",version=""} 2.0' in text
            release.touch()
        assert [r.status_code for r in answers] == [200] * 4
        assert statistics("a").in_flight == statistics("b").in_flight == 0


async def test_two_apps_keep_their_pools_apart(
    serve: Any, tmp_path: Path, importable: None
) -> None:
    root = repository(tmp_path, {"a": scale(2)}, pool="shared", parallel_workers=1)
    first, second = V2App(repository=root), V2App(repository=root)
    async with serve(first) as one, serve(second) as two:
        ours, theirs = shared(first), shared(second)
        assert ours is not theirs and not set(ours.pids()) & set(theirs.pids())
        for client, pool in ((one, ours), (two, theirs)):
            response = await infer(client, "a", 2)
            assert output(response, "y") == [4] and output(response, "pid") == pool.pids()


async def test_a_worker_killed_mid_request_fails_that_request_alone(
    serve: Any, tmp_path: Path, importable: None
) -> None:
    models = {"a": scale(2), "b": scale(3)}
    app = V2App(repository=repository(tmp_path, models, pool="shared", parallel_workers=2))
    async with serve(app) as client:
        pool = shared(app)
        before = set(pool.pids())
        slow: list[httpx.Response] = []

        async def slow_b() -> None:
            slow.append(await infer(client, "b", 5, seconds=1.0))

        async with anyio.create_task_group() as group:
            group.start_soon(slow_b)
            b = app.registry.get("b")
            await eventually(
                lambda: (b.runner_statistics() or b).in_flight == 1,  # type: ignore[union-attr]
                explain=b.runner_statistics,
            )
            crash = await infer(client, "a", action="exit")
        assert crash.status_code == 500
        assert "exited with code 3 while running this request" in crash.json()["error"]
        assert slow[0].status_code == 200 and output(slow[0], "y") == [15]
        # The replacement loads both models; the other worker never stopped.
        await eventually(lambda: whole(pool, {"a", "b"}), explain=pool.loaded)
        assert len(set(pool.loaded()) & before) == 1
        for model, factor in (("a", 2), ("b", 3)):
            response = await infer(client, model, 4)
            assert response.status_code == 200 and output(response, "y") == [4 * factor]


async def test_load_and_unload_through_the_repository_api(
    serve: Any, tmp_path: Path, importable: None, caplog: pytest.LogCaptureFixture
) -> None:
    models = {
        "census": {"implementation": "shared_models.Census"},
        "heavy": {"implementation": "shared_models.Heavy"},
        "clingy": {"implementation": "shared_models.Clingy"},
    }
    app = V2App(repository=repository(tmp_path, models, pool="shared", parallel_workers=2))
    async with serve(app) as client:
        pool = shared(app)
        pids = set(pool.pids())
        assert await census(client, pids) == {pid: 1 for pid in pids}
        # A model something still holds cannot be freed: each worker says so.
        assert (await client.post("/v2/repository/models/clingy/unload")).status_code == 200
        kept = [r for r in caplog.records if "'clingy' is still referenced" in r.getMessage()]
        assert len(kept) == 2

        assert (await client.post("/v2/repository/models/heavy/unload")).status_code == 200
        assert pool.loaded() == {pid: {"census"} for pid in pids}
        # Its memory is released in every worker: no Heavy object survives a collection.
        assert await census(client, pids) == {pid: 0 for pid in pids}
        assert (await client.get("/v2/models/heavy/ready")).status_code != 200
        assert (await infer(client, "heavy")).status_code == 503

        # Loaded again into the running workers, not into new ones.
        assert (await client.post("/v2/repository/models/heavy/load")).status_code == 200
        assert set(pool.pids()) == pids
        assert pool.loaded() == {pid: {"census", "heavy"} for pid in pids}
        assert await census(client, pids) == {pid: 1 for pid in pids}
        response = await infer(client, "heavy")
        assert response.status_code == 200 and output(response, "y") == [1.0]

        # A replacement loads it too, though the template (started before it joined)
        # does not hold it.
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        await eventually(
            lambda: whole(pool, {"census", "heavy"}) and victim not in pool.loaded(),
            explain=pool.loaded,
        )
        pids = set(pool.pids())
        assert await census(client, pids) == {pid: 1 for pid in pids}


async def test_a_model_that_fails_to_load_fails_alone(
    serve: Any, tmp_path: Path, importable: None
) -> None:
    models = {"a": scale(2), "broken": {"implementation": "shared_models.FailsToLoad"}}
    root = repository(tmp_path, models, pool="shared", parallel_workers=2)
    app = V2App(repository=root)
    async with serve(app) as client:
        pool = shared(app)
        pids = set(pool.pids())
        index = {e["name"]: e for e in (await client.post("/v2/repository/index")).json()}
        assert index["a"]["state"] == "READY"
        assert index["broken"]["state"] == "UNAVAILABLE"
        assert "RuntimeError: no weights here" in index["broken"]["reason"]
        assert pool.loaded() == {pid: {"a"} for pid in pids}

        # Loading it again into the running pool fails the same way, and only it.
        answer = await client.post("/v2/repository/models/broken/load")
        assert answer.status_code == 400 and "no weights here" in answer.json()["error"]
        # A model whose load kills its worker processes: they are replaced without it.
        dies = tmp_path / "dies"
        dies.mkdir()
        document = {"implementation": "shared_models.DiesInLoad", "pool": "shared"}
        (dies / "model-settings.json").write_text(json.dumps({**document, "parallel_workers": 2}))
        answer = await client.post("/v2/repository/models/dies/load")
        assert answer.status_code == 400
        assert answer.json()["error"] == "failed to load model dies: its worker exited with code 7"
        await eventually(lambda: whole(pool, {"a"}), explain=pool.loaded)
        response = await infer(client, "a", 3)
        assert response.status_code == 200 and output(response, "y") == [6]


# -- settings ------------------------------------------------------------------------


async def test_settings_a_pool_cannot_honour_fail_at_load(
    serve: Any, tmp_path: Path, importable: None
) -> None:
    models = {
        "a": scale(2),
        "threads": {**scale(3), "threads_per_worker": 2},
        "local": {**scale(4), "parallel_workers": 0},
        "ray": {**scale(5), "pool_backend": "ray"},
        "more": {**scale(6), "pool": "small", "parallel_workers": 1},
        "mate": {**scale(7), "pool": "small", "parallel_workers": 1},
    }
    app = V2App(repository=repository(tmp_path, models, pool="shared", parallel_workers=1))
    async with serve(app) as client:
        index = {e["name"]: e for e in (await client.post("/v2/repository/index")).json()}
        assert index["a"]["state"] == "READY" and index["more"]["state"] == "READY"
        reasons = {name: index[name]["reason"] for name in ("threads", "local", "ray")}
        assert reasons["threads"] == (
            "model 'threads' cannot share pool 'shared': its threads_per_worker is 2, "
            "the pool's is 1"
        )
        assert "parallel_workers is 0" in reasons["local"]
        assert 'not pool_backend "ray"' in reasons["ray"]
        # Joining a running pool with more workers than it has cannot be honoured either
        # (were ``more`` alone in it, its pool would stop and start again, bigger).
        (tmp_path / "more" / "model-settings.json").write_text(
            json.dumps({**scale(6), "pool": "small", "parallel_workers": 2})
        )
        answer = await client.post("/v2/repository/models/more/load")
        assert answer.status_code == 400
        assert (
            "asks for 2 workers (parallel_workers) and the running pool has 1"
            in (answer.json()["error"])
        )
        assert (await infer(client, "a", 1)).status_code == 200


def test_pool_names_default_and_mlserver_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    gid = ModelSettings.model_validate({"name": "m", "parameters": {"inference_pool_gid": "g"}})
    assert gid.pool == "g"
    assert effective_settings(ModelSettings(name="m"), Settings()).pool is None  # own pools
    monkeypatch.setenv("V2MOUNT_DEFAULT_POOL", "everyone")
    server = load_settings()
    assert server.default_pool == "everyone"
    assert effective_settings(ModelSettings(name="m"), server).pool == "everyone"
    assert effective_settings(ModelSettings(name="m", pool="own"), server).pool == "own"
    assert effective_settings(ModelSettings(name="m", pool=None), server).pool is None
    local = ModelSettings(name="m", parallel_workers=0)
    assert effective_settings(local, server).pool is None
    with pytest.raises(SettingsError, match="default_pool"):
        load_settings(default_pool="x", pool_backend="ray")
