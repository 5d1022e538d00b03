"""
Errors an engine raises for one job: each becomes a precise PVX/2 FAIL code
for the consumer, and the node takes the next job. (Kept free of numpy so
the node's protocol code can use them without the audio stack.)
"""

from __future__ import annotations

from privox.messages import ErrorCode


class EngineError(Exception):
    """
    This job cannot be done; C{code} (a PVX/2 error code) and C{message} go to
    the consumer. The node stays up and takes the next job.
    """

    def __init__(self, message: str, code: str = ErrorCode.ENGINE_ERROR) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BadAudio(EngineError):
    """
    The upload is not audio we can decode (truncated, garbage, empty).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.BAD_REQUEST)


class Unsupported(EngineError):
    """
    A voice or language this model does not have.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.UNSUPPORTED_MODEL)


class Cancelled(EngineError):
    """
    The job was cancelled (CNCL, or its consumer went away): its engine
    stopped between two pieces of work.
    """

    def __init__(self) -> None:
        super().__init__("cancelled", ErrorCode.CANCELLED)
