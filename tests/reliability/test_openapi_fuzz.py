"""schemathesis against the app's own OpenAPI document: no 5xx, every error a JSON error.

schemathesis generates the requests (schema-valid ones, then schema-violating ones) for
every operation of ``GET /v2/docs/openapi.json``; the checks are ours:

- no 5xx, except 503 from a model that is not ready (the fuzzer unloads one);
- every answer other than 200 is JSON ``{"error": "<non-empty text>"}``;
- every status is one the document lists for the operation;
- every 200 body matches the document's response schema.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from v2mount import V2App
from v2mount.demo.models import Identity
from v2mount.testing import V2Client, serve

pytestmark = pytest.mark.slow

BASE = "http://v2mount.test"
#: Names a path may be pinned to (None: leave schemathesis's random name).
MODELS = ["echo", "typed", None]
#: The fuzzer may unload this one only, so the others stay ready.
SCRATCH = "scratch"
#: Schema-valid requests first, then schema-violating ones.
MODES: tuple[Any, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@pytest.fixture(scope="module")
def client() -> Iterator[V2Client]:
    typed = {"name": "typed", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]}
    models = [Identity({"name": "echo"}), Identity(typed), Identity({"name": SCRATCH})]
    with serve(V2App(models, model_parallel_workers=0)) as client:
        yield client


@pytest.fixture(scope="module")
def document(client: V2Client) -> dict[str, Any]:
    answer = client.get("/v2/docs/openapi.json")
    assert answer.status_code == 200
    return dict(answer.json())


def _problems(documented: set[str], response: Any, case: Any) -> list[str]:
    """What is wrong with one answer (nothing: an empty list)."""
    status = response.status_code
    found = []
    if status != 200:
        try:
            error = orjson.loads(response.content)["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            error = None
        if not isinstance(error, str) or not error:
            found.append(f"{status} without a JSON error: {response.text[:100]!r}")
        elif status >= 500 and not (status == 503 and "not ready" in error):
            found.append(f"{status}: {error}")
    if str(status) not in documented:
        found.append(f"undocumented status {status}")
    if status == 200 and response.headers.get("content-type") == "application/json":
        try:
            case.validate_response(response, checks=[response_schema_conformance])
        except FailureGroup as group:
            found += [f"200 body off schema: {failure.title}" for failure in group.exceptions]
    return found


def _fuzz(
    client: V2Client,
    operation: Any,
    mode: Any,
    examples: int,
    documented: set[str],
    statuses: Counter[int],
    problems: Counter[str],
) -> None:
    """Send ``examples`` generated requests for one operation and one mode."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), pin=st.sampled_from(MODELS))
    def run(case: Any, pin: str | None) -> None:
        parameters = case.path_parameters or {}
        if "name" in parameters:
            if operation.path.endswith("/unload"):
                parameters["name"] = SCRATCH
            elif pin is not None:
                parameters["name"] = pin
        request = case.as_transport_kwargs(base_url=BASE)
        request.pop("cookies", None)
        if "data" in request:
            request["content"] = request.pop("data")
        method, url = request.pop("method"), request.pop("url")
        response = client.request(method, url.removeprefix(BASE), **request)
        statuses[response.status_code] += 1
        for problem in _problems(documented, response, case):
            problems[f"{operation.label} ({mode.value}): {problem}"] += 1

    try:
        run()
    except Unsatisfiable:
        pass  # no schema-violating request exists for an operation without inputs


def test_the_openapi_document_fuzzed(
    client: V2Client, document: dict[str, Any], profile: Any, figures: Any
) -> None:
    schema = schemathesis.openapi.from_dict(document)
    problems: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        documented = set(document["paths"][operation.path][operation.method.lower()]["responses"])
        for mode in MODES:
            _fuzz(client, operation, mode, profile.examples, documented, statuses, problems)
    figures.add_statuses(
        "hostile input",
        "schemathesis: every operation of /v2/docs/openapi.json, valid and invalid requests",
        statuses,
        notes=f"{profile.examples} examples per operation and mode; statuses {dict(statuses)}",
    )
    assert sum(statuses.values()) > 0
    known = {
        # A documentation gap: test_the_document_lists_every_status_the_app_sends.
        f"POST /v2/repository/models/{{name}}/unload ({mode.value}): undocumented status 400"
        for mode in MODES
    }
    assert not {p: n for p, n in problems.items() if p not in known}, problems


def test_the_document_lists_every_status_the_app_sends(document: dict[str, Any]) -> None:
    paths = document["paths"]
    assert "400" in paths["/v2/repository/models/{name}/unload"]["post"]["responses"]
    for path in ("index", "models/{name}/load", "models/{name}/unload"):
        assert "413" in paths[f"/v2/repository/{path}"]["post"]["responses"], path
