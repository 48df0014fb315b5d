"""The published contract, fuzzed: schemathesis generates requests for every operation of the served
OpenAPI document (valid ones and broken ones) against `batch-api serve`, and every answer must be
documented, match its schema, never be a 5xx, and, when it is an error, be the OpenAI envelope."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from tests.support.server import ServerProcess

pytestmark = pytest.mark.e2e

API_KEY = "sk-fuzz-0123456789"
EXAMPLES_PER_OPERATION = 60


class NotTheOpenAIEnvelope(Failure):
    """A non-2xx answer that is not `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, *, operation: str, status: int, body: bytes) -> None:
        super().__init__(
            operation=operation,
            code="not_the_openai_envelope",
            title="Error answer outside the OpenAI envelope",
            message=f"HTTP {status}: {body[:300]!r}",
        )


@schemathesis.check
def openai_error_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code < 400:
        return None
    try:
        error = orjson.loads(response.content)["error"]
        well_formed = set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        well_formed = False
    if not well_formed:
        raise NotTheOpenAIEnvelope(
            operation=case.operation.label, status=response.status_code, body=response.content
        )
    return True


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    with ServerProcess(data_dir, "--api-key", API_KEY, "--max-request-bytes", str(256 * 1024)) as server:
        yield server


@pytest.fixture(scope="module")
def published_schema(fuzzed_server: ServerProcess) -> Any:
    root = fuzzed_server.base_url.removesuffix("/v1")
    return schemathesis.openapi.from_url(f"{root}/openapi.json")


def operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_documented(published_schema: Any, mode: GenerationMode) -> None:
    """Positive data (what the document allows) and negative data (what it does not), for every
    operation; schemathesis's own checks plus the envelope check above, on every answer."""
    failures: list[str] = []
    for operation in operations(published_schema):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def call(case: Any) -> None:
            case.call_and_validate(
                headers={"Authorization": f"Bearer {API_KEY}"},
                # The document describes shapes; the API also checks meaning (an input file that must
                # exist, a .jsonl name for `batch` files) and answers a documented 400 when it fails.
                # And, like OpenAI's, it ignores query parameters and JSON fields it does not know
                # (newer SDKs send them), which schemathesis would have refused.
                excluded_checks=[positive_data_acceptance, negative_data_rejection],
            )

        try:
            call()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_the_document_is_openapi_3_with_bearer_auth_and_every_operation(published_schema: Any) -> None:
    raw = published_schema.raw_schema
    assert raw["openapi"].startswith("3.")
    assert raw["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key of this deployment; each key is a project.",
    }
    assert raw["security"] == [{"bearerAuth": []}]
    operations = {
        (method.upper(), path)
        for path, item in raw["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert operations == {
        ("POST", "/v1/files"),
        ("GET", "/v1/files"),
        ("GET", "/v1/files/{file_id}"),
        ("DELETE", "/v1/files/{file_id}"),
        ("GET", "/v1/files/{file_id}/content"),
        ("GET", "/v1/files/{file_id}/link"),
        ("POST", "/v1/uploads"),
        ("POST", "/v1/uploads/{upload_id}/parts"),
        ("POST", "/v1/uploads/{upload_id}/complete"),
        ("POST", "/v1/uploads/{upload_id}/cancel"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches"),
        ("GET", "/v1/batches/{batch_id}"),
        ("POST", "/v1/batches/{batch_id}/cancel"),
    }
