"""
atheris: HELO, JOB_ and RSLT payloads as the farm decodes them. Any bytes:
a parsed message, or ProtocolViolation / BadRequest, never another error.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_messages.py -runs=200000
"""

import sys

import atheris

with atheris.instrument_imports():
    from privox.framing import Frame
    from privox.messages import (
        BadRequest,
        Hello,
        JobRequest,
        ProtocolViolation,
        decodeObject,
        resultSize,
    )


def test(data: bytes) -> None:
    # The first byte picks the message (HELO, stt JOB_, tts JOB_, RSLT).
    which = data[0] % 4 if data else 0
    payload = data[1:]
    verb = (b"HELO", b"JOB_", b"JOB_", b"RSLT")[which]
    try:
        fields = decodeObject(Frame(verb, payload))
    except ProtocolViolation:
        return
    try:
        if which == 0:
            Hello.parse(fields)
        elif which in (1, 2):
            request = JobRequest.parse(("stt", "tts")[which - 1], fields)
            request.payload()
        else:
            resultSize(fields)
    except (BadRequest, ProtocolViolation):
        pass


if __name__ == "__main__":
    atheris.instrument_all()
    atheris.Setup(sys.argv, test)
    atheris.Fuzz()
