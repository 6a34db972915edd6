"""The way of one request through a model with stages (``v2mount.stages``), in the parent.

With a batcher: ``preprocess`` in the runner (a worker of the pool, or a worker thread),
then the batcher merges the preprocessed request with others and the runner's ``predict``
answers the batch, then ``postprocess`` on this request's rows in the runner. Without
one: the whole chain in one call to the runner (one trip to a worker).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from v2mount.errors import ModelError
from v2mount.model import Model, has_postprocess
from v2mount.runner import StagedRunner
from v2mount.stages import Timings, has_preprocess
from v2mount.types import InferenceRequest, InferenceResponse

__all__ = ["Executor", "Pipeline"]


class Executor(Protocol):
    """What answers a preprocessed request: a batcher or the runner itself."""

    async def infer(self, request: InferenceRequest) -> InferenceResponse: ...


class Pipeline:
    """Offers ``infer`` like a runner, for a model with stages. Runs on the event loop.

    ``observe(stage, seconds)`` is called for each stage a request ran. An error in
    ``preprocess`` or ``postprocess`` answers this request alone (a request whose
    preprocess failed never joins a batch); an error in a batched ``predict`` answers
    every request of its batch, with ``predict`` named in its text. Cancellation: as
    the runner's and the batcher's.
    """

    def __init__(
        self,
        model: Model,
        runner: StagedRunner,
        batcher: Executor | None,
        observe: Callable[[str, float], None],
    ) -> None:
        self._runner = runner
        self._batcher = batcher
        self._observe = observe
        self._preprocess = has_preprocess(model)
        self._postprocess = has_postprocess(model)

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        runner, batcher = self._runner, self._batcher
        if batcher is None:
            response, timings = await runner.infer_staged(request)
            self._record(timings)
            return response
        prepared = request
        if self._preprocess:
            prepared, timings = await runner.preprocess(request)
            self._record(timings)
        try:
            response = await batcher.infer(prepared)
        except ModelError as exc:
            if type(exc) is not ModelError or exc.message.startswith("predict"):
                raise
            raise ModelError(f"predict failed: {exc.message}") from exc
        del prepared
        if self._postprocess:
            response, timings = await runner.postprocess(request, response)
            self._record(timings)
        return response

    def _record(self, timings: Timings) -> None:
        for stage, seconds in timings:
            self._observe(stage, seconds)
