"""Request sizes: the limits of a deployment and the one message that tells a caller how to fit them.

On AWS a request reaches the API Lambda as an API Gateway proxy event, and a synchronous invoke takes
at most `LAMBDA_SYNC_PAYLOAD_BYTES` of event JSON. Bodies travel base64 (the API declares every media
type binary, so files arrive byte-exact): 4 bytes of event for 3 of body. Around the body the event
carries the request line and headers more than once (`headers`, `multiValueHeaders`, the path in
`path`, `resource` and `requestContext`, the user agent in `requestContext.identity`), JSON-quoted;
API Gateway caps the request line and headers of a REST API at `GATEWAY_MAX_REQUEST_HEAD_BYTES`.
`proxy_max_request_bytes()` is the largest body that fits with the largest head, and the stack sets
it as the API's `max_request_bytes`: a body over it is refused by the handler (413); a body that
would not even fit the invoke is refused by API Gateway itself (its REQUEST_TOO_LARGE response, also
413, the stack words it with `too_large_message`). Neither is a 5xx the SDK would retry.
"""

from __future__ import annotations

LAMBDA_SYNC_PAYLOAD_BYTES = 6_291_456  # Lambda: "Request must be smaller than 6291456 bytes"
LAMBDA_SYNC_RESPONSE_BYTES = 6_291_556  # and 100 bytes more for the answer
GATEWAY_MAX_REQUEST_HEAD_BYTES = 10_240  # API Gateway REST: request line and headers together
GATEWAY_MAX_BODY_BYTES = 10 * 1024 * 1024  # API Gateway REST: the largest body it accepts at all
# The head appears at most 5 times in the event (headers, multiValueHeaders, path x3 or user agent),
# each byte at most 2 bytes once JSON-quoted; the rest of requestContext is under 4 KiB.
EVENT_RESERVE_BYTES = GATEWAY_MAX_REQUEST_HEAD_BYTES * 5 * 2 + 4096
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # the form fields, headers and boundaries around an Uploads part
_MIB = 1024 * 1024


def base64_length(size: int) -> int:
    """How many characters `size` bytes take in base64 (padded)."""
    return (size + 2) // 3 * 4


def proxy_max_request_bytes() -> int:
    """The largest raw body whose proxy event fits a synchronous Lambda invoke with the largest head."""
    return (LAMBDA_SYNC_PAYLOAD_BYTES - EVENT_RESERVE_BYTES) // 4 * 3


def proxy_max_inline_download_bytes() -> int:
    """The largest file body the API answers inline (base64) within Lambda's response limit; bigger
    ones are a 302 to a signed link. A whole MiB count, with room for the response's headers."""
    room = (LAMBDA_SYNC_RESPONSE_BYTES - 64 * 1024) // 4 * 3
    return room // _MIB * _MIB


def part_size_for(max_request_bytes: int, max_part_bytes: int) -> int:
    """An Uploads part size whose request fits `max_request_bytes` (whole MiB when it can be)."""
    size = min(max_part_bytes, max_request_bytes - MULTIPART_OVERHEAD_BYTES)
    if size >= _MIB:
        return size // _MIB * _MIB
    return max(size, 1)


def too_large_message(max_request_bytes: int, part_size: int, size: int | None = None) -> str:
    """The 413's message, from the handler and from API Gateway alike: the limit and what fits it."""
    got = f"of {size} bytes " if size is not None else ""
    return (
        f"The request body {got}exceeds this endpoint's limit of {max_request_bytes} bytes. "
        "Send larger files with the Uploads API in Parts that fit, e.g. "
        "client.uploads.upload_file_chunked(file=..., mime_type=..., purpose=..., "
        f"part_size={part_size})."
    )
