"""
atheris: the PVX/1 job header parser. Any bytes: fields or BadHeader, and
then a JobRequest or BadRequest.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_pvx1.py -runs=200000
"""

import sys

import atheris

with atheris.instrument_imports():
    from privox.farm.settings import FarmSettings
    from privox.farm.pvx1 import BadHeader, aliasesFor, isComplete, parseHeader, requestFrom
    from privox.messages import BadRequest

SETTINGS = FarmSettings()
ALIASES = {service: aliasesFor(SETTINGS, service) for service in ("stt", "tts")}


def test(data: bytes) -> None:
    # The first byte picks the service.
    service = "tts" if data[:1] and data[0] & 1 else "stt"
    raw = data[1:]
    try:
        fields = parseHeader(service, raw)
    except BadHeader:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    isComplete(service, fields)
    try:
        requestFrom(service, fields, ALIASES[service])
    except BadRequest:
        pass


if __name__ == "__main__":
    atheris.instrument_all()
    atheris.Setup(sys.argv, test)
    atheris.Fuzz()
