"""schemathesis against the OpenAPI document the real app serves over loopback.

Bounded (a few hundred generated requests): no answer is a 5xx, every answer conforms to the
document (its status is documented for the operation, its Content-Type and headers are the
documented ones, its body validates against the generated schema), and input the gateway refuses
queues nothing.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness import OPERATOR_KEY, PARTNER_KEY, ServerThread, message_keys
from worker.front.openapi import openapi_document
from worker.runtime import Runtime

# The document the app serves (the same function builds /openapi.json); requests go to the real
# app over loopback. Loaded here because schemathesis' fixture loader does not run on pytest 9.
schema = schemathesis.openapi.from_dict(openapi_document("http://127.0.0.1"))
# What every answer is checked for (schemathesis' own checks, named so none is left out by a
# change of its defaults).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_generated_requests_get_documented_answers_and_refused_input_queues_nothing(
    case, server: ServerThread, runtime: Runtime
):
    key = OPERATOR_KEY if case.path.startswith("/notifications") else PARTNER_KEY
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
    before = message_keys(runtime)
    response = case.call_and_validate(base_url=server.url, timeout=10, checks=CHECKS)
    assert response.status_code < 500, response.text
    if case.method == "POST" and case.path.startswith("/messages") and response.status_code != 202:
        assert message_keys(runtime) == before
