"""/openapi.json, and schemathesis driving the API from it through the real HTTP stack.

The description is generated from the request structs, so it is checked against them; then
schemathesis generates valid and invalid requests for every operation (positive and negative
modes, a bounded derandomized budget for CI; NOVAINFER_FUZZ_EXAMPLES raises it): never a
5xx, every error in OpenAI's shape, and a normal request still answers afterwards. The
hypothesis fuzz test (test_gateway_fuzz.py) covers what a schema cannot: non-JSON bodies,
deep nesting, unknown fields.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from services.gateway.openai_api import ChatBody, CompletionBody, DetokenizeBody, TokenizeBody
from services.gateway.responses_api import ResponsesBody
from tests.gateway.fakes import MODEL, Gateway
from tests.gateway.test_gateway_fuzz import live_gateway  # noqa: F401 (a fixture)

EXAMPLES = int(os.environ.get("NOVAINFER_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


def spec(gw: Gateway) -> dict[str, Any]:
    r = requests.get(gw.url + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    return r.json()


def test_openapi_json_is_generated_from_the_request_structs(live_gateway: Gateway) -> None:  # noqa: F811
    doc = spec(live_gateway)
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for struct in (CompletionBody, ChatBody, ResponsesBody, TokenizeBody, DetokenizeBody):
        assert set(schemas[struct.__name__]["properties"]) == set(struct.__struct_fields__)
    completions = doc["paths"]["/v1/completions"]["post"]
    assert completions["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CompletionBody"
    }
    error = completions["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(schemas["ErrorObject"]["required"]) == {"message", "type", "param", "code"}
    schemathesis.openapi.from_dict(doc)  # a valid OpenAPI document, as schemathesis reads it


@schemathesis.check
def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code < 400:
        return None
    body = msgspec.json.decode(response.content)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), body
    return True


BODIES = [
    ("/v1/completions", "POST"),
    ("/v1/chat/completions", "POST"),
    ("/v1/responses", "POST"),
    ("/tokenize", "POST"),
    ("/detokenize", "POST"),
]
# Path parameters are any string: there is no invalid one to generate.
OPERATIONS = [(*op, GenerationMode.POSITIVE) for op in BODIES] + [(*op, GenerationMode.NEGATIVE) for op in BODIES]
OPERATIONS += [("/v1/models/{model}", "GET", GenerationMode.POSITIVE)]
OPERATIONS += [("/v1/requests/{request_id}/cancel", "POST", GenerationMode.POSITIVE)]
OPERATIONS += [("/v1/responses/{response_id}", method, GenerationMode.POSITIVE) for method in ("GET", "DELETE")]
OPERATIONS += [("/v1/responses/{response_id}/input_items", "GET", mode) for mode in GenerationMode]


@pytest.mark.parametrize("path,method,mode", OPERATIONS, ids=[f"{m} {p} {g.value}" for p, m, g in OPERATIONS])
def test_schemathesis(live_gateway: Gateway, path: str, method: str, mode: GenerationMode) -> None:  # noqa: F811
    schema = schemathesis.openapi.from_dict(spec(live_gateway))
    operation = schema[path][method]
    session = requests.Session()

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        # The 10 s timeout is the "no hang" check: the fake workers answer in milliseconds.
        response = case.call(base_url=live_gateway.url, session=session, timeout=10)
        case.validate_response(response, checks=[not_a_server_error, openai_error_shape])

    run()
    r = session.post(live_gateway.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
