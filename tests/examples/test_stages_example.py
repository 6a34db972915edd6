"""``examples/stages``: the colour classifier, whose stages run in a pool of two workers."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.support import load_module
from v2mount.testing import V2Client
from v2mount.testing.client import V2HTTPError

SyncFactory = Callable[..., V2Client]


def _classifier(examples: Path) -> ModuleType:
    path = examples / "stages" / "colours" / "classifier.py"
    return load_module(path, "v2mount_example_colours")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_each_picture_gets_its_colour_through_batched_predict(
    v2_client: SyncFactory, examples: Path, backend: str
) -> None:
    ppm = _classifier(examples).ppm
    colours = {"red": (220, 30, 10), "green": (5, 200, 40), "blue": (0, 20, 240)}
    colours |= {"white": (250, 250, 240), "black": (10, 5, 20)}
    client = v2_client(examples / "stages", backend=backend)

    def classify(name: str, size: tuple[int, int]) -> tuple[str, str, float]:
        picture = np.empty((*size, 3), np.uint8)
        picture[...] = colours[name]
        image = np.array([ppm(picture)], dtype=object)
        result = client.infer("colours", {"image": image}, binary=True)
        return name, result["label"][0].decode(), float(result["probability"][0])

    sizes = [(48, 64), (200, 120), (64, 64), (31, 97), (128, 128)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(classify, [*colours] * 2, sizes * 2))
    for expected, label, probability in answers:
        assert label == expected
        assert 0.5 < probability <= 1.0

    with pytest.raises(V2HTTPError) as refused:
        client.infer("colours", {"image": np.array([b"GIF89a not a ppm"], dtype=object)})
    assert refused.value.status_code == 400
    assert refused.value.error == "preprocess: the image is not an 8-bit binary PPM file"
    assert client.ready("colours")
