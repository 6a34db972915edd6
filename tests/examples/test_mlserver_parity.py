"""The parity table of docs/migrating-from-mlserver.md, run against ``examples/models``.

Each row of the table is a check here (and the other way round): the request goes to
the iris example and the answer must be the one the table's v2mount column gives.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from v2mount.testing import V2Client

SyncFactory = Callable[..., V2Client]
PAGE = Path(__file__).resolve().parents[2] / "docs" / "migrating-from-mlserver.md"
TWO = [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]


def features(datatype: str = "FP64", name: str = "features", **changes: Any) -> dict[str, Any]:
    data = [int(v) for v in TWO] if datatype.startswith("INT") else TWO
    if datatype == "BYTES":
        data = [str(v) for v in TWO]
    return {"name": name, "datatype": datatype, "shape": [2, 4], "data": data, **changes}


def infer(client: V2Client, *inputs: dict[str, Any], **body: Any) -> httpx.Response:
    return client.post("/v2/models/iris/infer", json={"inputs": list(inputs), **body})


def outputs(answer: httpx.Response) -> dict[str, tuple[str, list[int]]]:
    assert answer.status_code == 200, answer.text
    return {o["name"]: (o["datatype"], o["shape"]) for o in answer.json()["outputs"]}


def named(*names: str) -> list[dict[str, str]]:
    return [{"name": name} for name in names]


def error(answer: httpx.Response, status: int, *phrases: str) -> None:
    assert answer.status_code == status, answer.text
    text = answer.json()["error"]
    assert all(phrase in text for phrase in phrases), text


PREDICT = {"predict": ("INT64", [2, 1])}
BOTH = {**PREDICT, "predict_proba": ("FP64", [2, 3])}

Check = Callable[[V2Client], None]
ROWS: dict[str, Check] = {}


def row(label: str) -> Callable[[Check], Check]:
    """Register a check under the label of its row in the page's table."""

    def register(check: Check) -> Check:
        ROWS[label] = check
        return check

    return register


@row("FP64 `features` `[2, 4]`, no outputs named")
def _every_declared_output(c: V2Client) -> None:
    assert outputs(infer(c, features())) == BOTH


@row("outputs `predict`")
def _predict(c: V2Client) -> None:
    assert outputs(infer(c, features(), outputs=named("predict"))) == PREDICT


@row("outputs `predict` and `predict_proba`")
def _both(c: V2Client) -> None:
    assert outputs(infer(c, features(), outputs=named("predict", "predict_proba"))) == BOTH


@row("FP32 `features` (declared FP64)")
def _fp32(c: V2Client) -> None:
    assert outputs(infer(c, features("FP32"))) == BOTH


@row("INT32 `features` (declared FP64)")
def _int32(c: V2Client) -> None:
    assert outputs(infer(c, features("INT32"))) == BOTH


@row("INT64 `features` (declared FP64)")
def _int64(c: V2Client) -> None:
    error(infer(c, features("INT64")), 400, "input 'features': datatype INT64", "FP64")


@row("one input named `x`, not `features`")
def _any_name(c: V2Client) -> None:
    assert outputs(infer(c, features(name="x"))) == BOTH


@row("two inputs")
def _two_inputs(c: V2Client) -> None:
    error(infer(c, features(), features(name="x")), 400)


@row("an `id`")
def _given_id(c: V2Client) -> None:
    answer = infer(c, features(), id="abc")
    assert answer.status_code == 200 and answer.json()["id"] == "abc"


@row("no `id`")
def _new_id(c: V2Client) -> None:
    answer = infer(c, features())
    assert answer.status_code == 200 and uuid.UUID(answer.json()["id"]).version == 4


@row("shape `[1, 3]` (declared `[-1, 4]`)")
def _bad_shape(c: V2Client) -> None:
    answer = infer(c, features(shape=[1, 3], data=TWO[:3]))
    error(answer, 400, "'features'", "[1, 3]", "[-1, 4]")


@row("BYTES `features`")
def _bytes(c: V2Client) -> None:
    error(infer(c, features("BYTES")), 400, "'features'", "BYTES", "FP64")


@row("output `nope`")
def _unknown_output(c: V2Client) -> None:
    error(infer(c, features(), outputs=named("nope")), 400, "'nope'")


@row("model `nope`")
def _unknown_model(c: V2Client) -> None:
    error(c.post("/v2/models/nope/infer", json={"inputs": [features()]}), 404)


@row("each output's `parameters`")
def _no_output_parameters(c: V2Client) -> None:
    answer = infer(c, features())
    assert answer.status_code == 200
    assert all("parameters" not in output for output in answer.json()["outputs"])


def table_rows() -> list[str]:
    """The first cell of each row of the page's parity table (backticks kept)."""
    lines = PAGE.read_text(encoding="utf-8").splitlines()
    start = lines.index("| request to `iris` | MLServer 1.7.1 | v2mount |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(re.split(r"\s\|\s", line.strip("| "))[0])
    return rows


def test_the_page_and_the_checks_list_the_same_rows() -> None:
    assert table_rows() == list(ROWS)


def test_the_parity_table_holds_for_the_example_repository(
    v2_client: SyncFactory, models: Path
) -> None:
    client = v2_client(models)
    for row, check in ROWS.items():
        try:
            check(client)
        except AssertionError as exc:
            raise AssertionError(f"parity row {row!r}: {exc}") from exc
