"""
atheris: the PVX/2 frame decoder. Any bytes, cut anywhere: frames within
max_frame or a FramingError, and the same answer however they were cut.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_framing.py -runs=200000
"""

import sys

import atheris

with atheris.instrument_imports():
    from privox.framing import VERBS, FrameDecoder, FramingError


def run(pieces):
    decoder = FrameDecoder(256)
    frames = []
    try:
        for piece in pieces:
            frames += decoder.feed(piece)
    except FramingError:
        return frames, True
    return frames, False


def test(data: bytes) -> None:
    # The first byte picks how the rest is cut.
    step = data[0] % 64 + 1 if data else 1
    stream = data[1:]
    whole, wholeBad = run([stream])
    cut, cutBad = run([stream[i : i + step] for i in range(0, len(stream), step)])
    assert wholeBad == cutBad, (stream, step)
    if not wholeBad:
        assert whole == cut
    for frame in whole + cut:
        assert frame.verb in VERBS and len(frame.payload) <= 256


if __name__ == "__main__":
    atheris.instrument_all()
    atheris.Setup(sys.argv, test)
    atheris.Fuzz()
