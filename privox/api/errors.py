"""
What can go wrong with an API request, as HTTP statuses with a one-line
reason; and how a PVX/2 FAIL code becomes one.
"""

from __future__ import annotations

import json

from privox.messages import ErrorCode


class ApiError(Exception):
    """
    A request that ends in an error response.

    @ivar status: the HTTP status.
    @ivar kind: a short machine-readable name (the OpenAI-style C{type}).
    @ivar retryAfter: seconds for a C{Retry-After} header, if any.
    """

    status = 500
    kind = "server_error"

    def __init__(self, message: str, retryAfter: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryAfter = retryAfter


class BadInput(ApiError):
    status = 400
    kind = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    kind = "authentication_error"


class Forbidden(ApiError):
    """
    A key that may not do this: an unknown or revoked key enrolling a node.
    """

    status = 403
    kind = "permission_error"


class TooLarge(ApiError):
    status = 413
    kind = "request_too_large"


class Unprocessable(ApiError):
    status = 422
    kind = "unsupported"


class NotServed(ApiError):
    status = 404
    kind = "not_found"


class Conflict(ApiError):
    """
    A name already someone else's (a farm registering another's name).
    """

    status = 409
    kind = "conflict"


class OverQuota(ApiError):
    """
    The key's audio allowance for the rolling hour is used up.
    """

    status = 429
    kind = "rate_limit_exceeded"


class Unavailable(ApiError):
    status = 503
    kind = "no_capacity"

    def __init__(self, message: str, retryAfter: int | None = 5) -> None:
        super().__init__(message, retryAfter)


class NoProducer(Unavailable):
    """
    No connected producer serves what the job asks for (a farm's
    C{no_producer}): nodes may be reconnecting, or none does it at all.
    """


class TimedOut(ApiError):
    status = 504
    kind = "timeout"


#: FAIL codes worth another farm: the next one may have a free, healthy producer.
RETRYABLE = frozenset(
    [ErrorCode.NO_PRODUCER, ErrorCode.PRODUCER_LOST, ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN]
)

_BY_CODE: dict[str, type[ApiError]] = {
    ErrorCode.BAD_REQUEST: BadInput,
    ErrorCode.UNAUTHORIZED: Unavailable,  # the farm refused *us*: not the user's fault
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.UNSUPPORTED_MODEL: Unprocessable,
    ErrorCode.NO_PRODUCER: NoProducer,
    ErrorCode.PRODUCER_LOST: Unavailable,
    ErrorCode.SHUTTING_DOWN: Unavailable,
    ErrorCode.TIMEOUT: TimedOut,
    ErrorCode.ENGINE_ERROR: ApiError,
}


def fromFailCode(code: str, message: str) -> ApiError:
    """
    The API error for a farm's C{FAIL code}.
    """
    return _BY_CODE.get(code, ApiError)(message)


#: OpenAI-style C{code} for each status.
_CODES = {
    400: "bad_request",
    401: "invalid_api_key",
    403: "forbidden",
    413: "request_too_large",
    422: "unsupported",
    404: "not_found",
    405: "method_not_allowed",
    429: "rate_limit_exceeded",
    503: "no_capacity",
    504: "timeout",
}


def errorBody(error: ApiError, openai: bool) -> tuple[bytes, bytes]:
    """
    The body of an error response and its content type: OpenAI's
    C{{"error": {"message", "type", "code"}}} under C{/v1}, else a line of
    text.
    """
    message = " ".join(error.message.split()) or error.kind
    if openai:
        body = {"error": {"message": message, "type": error.kind,
                          "code": _CODES.get(error.status, error.kind)}}
        return b"application/json", json.dumps(body, ensure_ascii=False).encode("utf-8")
    return b"text/plain; charset=utf-8", (message + "\n").encode("utf-8")


def tooLarge(size: int, limit: int, name: str) -> TooLarge:
    """
    @param name: which limit it is (C{--max-upload}...), for the reason.
    """
    return TooLarge(f"the request is {size} bytes; the limit is {limit} bytes ({name})")
