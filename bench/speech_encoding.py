"""
What encoding OpenAI's speech formats costs the API: CPU seconds per minute
of audio for each ``response_format`` of ``/v1/audio/speech``, whole
(``encodeSpeech``, as an unstreamed answer: at speed 1 and at 2, which adds
the time stretch) and sentence by sentence (``SpeechEncoder``, as a
streamed answer is made), side by side in one run, on a minute of Piper's
speech (joe-medium, 22.05 kHz).

    PYTHONPATH=. .venv/bin/python bench/speech_encoding.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from privox.api.speech import CONTENT_TYPES, SpeechEncoder, encodeSpeech  # noqa: E402
from privox.engines.base import TTSJob  # noqa: E402
from privox.engines.piper import PiperEngine  # noqa: E402
from privox.wav import joinWavs, pcmToWav, wavPCM  # noqa: E402

SENTENCES = [
    "A volunteer runs this node on an old laptop.",
    "It turns text into speech for people who need it.",
    "Every job travels through the farm and back again.",
    "The farm never sees the words, only sealed bytes.",
]


def speech(seconds: float) -> tuple[list[bytes], int]:
    """
    Sentences of Piper's speech, as PCM, about C{seconds} in all.
    """
    engine = PiperEngine("en_US-joe-medium", deterministic=True)
    engine.load()
    pieces = []
    for text in SENTENCES:
        pcm, rate = wavPCM(engine.synthesize(TTSJob(engine.name, None, None, text)))
        pieces.append(pcm)
    total, out = 0.0, []
    while total < seconds:
        for pcm in pieces:
            out.append(pcm)
            total += len(pcm) / 2 / rate
    return out, rate


def cpu(f, *args) -> float:
    started = time.process_time()
    f(*args)
    return time.process_time() - started


def streamed(format: str, sentences: list[bytes], rate: int) -> None:
    encoder = SpeechEncoder(format)
    for pcm in sentences:
        encoder.feed(pcm, rate)
    encoder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s of audio, 2 repeats")
    args = parser.parse_args()
    seconds, repeats = (20.0, 2) if args.quick else (60.0, 5)
    sentences, rate = speech(seconds)
    audio = sum(len(p) for p in sentences) / 2 / rate
    wav = joinWavs([pcmToWav(p, rate) for p in sentences])
    perMinute = 60.0 / audio
    print(f"{audio:.1f} s of speech at {rate} Hz, {repeats} repeats; CPU s per minute of audio (median)")
    print(f"{'format':8} {'whole':>8} {'speed 2':>8} {'streamed':>9}")
    for format in CONTENT_TYPES:
        whole = statistics.median(cpu(encodeSpeech, wav, format) for _ in range(repeats))
        fast = statistics.median(cpu(encodeSpeech, wav, format, 2.0) for _ in range(repeats))
        stream = statistics.median(cpu(streamed, format, sentences, rate) for _ in range(repeats))
        print(f"{format:8} {whole * perMinute:8.3f} {fast * perMinute:8.3f} {stream * perMinute:9.3f}")


if __name__ == "__main__":
    main()
