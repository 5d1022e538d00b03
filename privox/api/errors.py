"""
What can go wrong with an API request, as HTTP statuses with a one-line
reason; and how a PVX/2 FAIL code becomes one.
"""

from __future__ import annotations

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


class TooLarge(ApiError):
    status = 413
    kind = "request_too_large"


class Unsupported(ApiError):
    status = 422
    kind = "unsupported"


class NotServed(ApiError):
    status = 404
    kind = "not_found"


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
    ErrorCode.UNSUPPORTED_MODEL: Unsupported,
    ErrorCode.NO_PRODUCER: Unavailable,
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
