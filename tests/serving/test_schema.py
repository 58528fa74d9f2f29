"""The server's OpenAPI schema: complete (every route's errors, the request body, the key) and valid, and
schemathesis against it on loopback with a tiny model: no 5xx, and every response conforms to the schema."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conftest import TEXTS, make_model
from serving.conftest import API_KEY, MODEL_NAME, make_app, running_server
from vlmlab.processing.tokenizer import train_bpe_tokenizer
from vlmlab.serving.limits import Limits

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Built at import: schemathesis makes one test per operation when the module is collected. 4 tokens unless a
# request asks for more (at most 128, the context), so that generated requests stay fast.
SERVED = make_model(train_bpe_tokenizer(TEXTS, vocab_size=320))
APP = make_app(SERVED, limits=Limits(default_max_tokens=4))
CONFIG = schemathesis.Config.from_dict({"generation": {"max-examples": 50, "deterministic": True}})
schema = schemathesis.openapi.from_dict(APP.openapi(), config=CONFIG)
ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


@schema.hook
def map_case(context, case):
    """Schema-valid requests name the served model, so that they get past the 404 to the images, the context
    check and generation (schema-invalid ones keep whatever they were generated with)."""
    if case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict):
        case.body["model"] = MODEL_NAME
    return case


@pytest.fixture(scope="module")
def base_url():
    with running_server(APP) as url:
        yield url


@schema.parametrize()
def test_api(case, base_url):
    """Every check schemathesis has but ``positive_data_acceptance``: a request the schema allows may still be
    refused for what no schema says (an image URL that is not an image, a model not served, a prompt over the
    context), and those are the 400s and 404s the schema documents."""
    case.call_and_validate(base_url=base_url, headers=AUTH, excluded_checks=[positive_data_acceptance])


def test_the_schema_is_valid_and_served(base_url):
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    served = schemathesis.openapi.from_url(base_url + "/openapi.json", headers=AUTH)
    assert served.raw_schema == APP.openapi()
    assert httpx.get(base_url + "/openapi.json").status_code == 401


def test_every_route_documents_its_responses():
    spec = APP.openapi()
    operations = {(m.upper(), path): op for path, item in spec["paths"].items() for m, op in item.items()}
    assert set(operations) == {("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")}
    expected_errors = {
        ("GET", "/health"): {"500", "503"},
        ("GET", "/v1/models"): {"401", "500"},
        ("POST", "/v1/chat/completions"): {"400", "401", "404", "413", "415", "429", "500", "503"},
    }
    for key, op in operations.items():
        responses = op["responses"]
        assert set(responses) == {"200"} | expected_errors[key], key
        for status in expected_errors[key]:
            assert responses[status]["content"] == ERROR and responses[status]["description"], (key, status)
        assert "$ref" in responses["200"]["content"]["application/json"]["schema"], (
            key
        )  # a model, not "object"
    chat = operations["POST", "/v1/chat/completions"]
    assert chat["requestBody"] == {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}},
    }
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    components = spec["components"]["schemas"]
    refs = [ref for ref in _refs(spec)]
    assert refs and all(ref.removeprefix("#/components/schemas/") in components for ref in refs)
    assert set(components["ChatRequest"]["required"]) == {"model", "messages"}


def test_the_key_is_documented_as_the_security_of_every_route_but_health():
    spec = APP.openapi()
    assert spec["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "The API key"},
        "basic": {"type": "http", "scheme": "basic", "description": "The API key as the password"},
    }
    assert spec["security"] == [{"bearer": []}, {"basic": []}]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert "security" not in spec["paths"]["/v1/models"]["get"]
    keyless = make_app(SERVED, api_key=None).openapi()
    assert "security" not in keyless and "securitySchemes" not in keyless["components"]


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)
