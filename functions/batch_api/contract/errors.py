"""Domain errors. The API handler maps each to one HTTP status in the OpenAI error envelope.

Every layer raises these; only `handlers/errors.py` turns them into HTTP answers.
"""

from __future__ import annotations

from collections.abc import Mapping


def json_kind(value: object) -> str:
    """How OpenAI's messages name a JSON value's type: "an array", "an integer", "a boolean", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


class ApiError(Exception):
    """An error the caller should see, in the OpenAI envelope."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None
    retryable: bool | None = None  # None: let the client decide from the status code

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def envelope(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(ApiError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFound(ApiError):
    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowed(ApiError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"
    retryable = False


class Conflict(ApiError):
    """A state conflict that retrying will not fix (the SDK retries 409 unless told not to)."""

    status_code = 409
    error_type = "invalid_request_error"
    retryable = False


class PayloadTooLarge(ApiError):
    """The same request will be as large next time: the SDK is told not to retry it."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"
    retryable = False


class RateLimited(ApiError):
    status_code = 429
    error_type = "rate_limit_exceeded"


class ServerError(ApiError):
    status_code = 500
    error_type = "server_error"


class ConditionFailed(Exception):
    """A conditional write lost: the stored record was not in the state the writer expected.

    Raised by metadata adapters; the service layer decides what it means for the caller.
    """


class AlreadyExists(ConditionFailed):
    """A create-if-absent write found the record already there."""
