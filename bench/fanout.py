"""
How much faster is a long recording when its pieces go to several
producers at once (``privox.api.fanout``, issue 21)?

Two parts, each through a real farm (``tests/apifarms.LiveFarm``, in this
process) and real node processes (``twistd privox-node``), the pieces sent
by the API's own ``FanOut`` over its ``FarmExchange`` (everything the API
does for a long upload but the HTTP around it):

  1. A 10-minute recording (noise bursts with pauses: a stand-in for
     speech) on 1, 2 and 4 producers (one node with ``--slots N``) of the
     model-free ``sleep:RTF`` engine, which sleeps RTF seconds per second
     of audio like an engine with a fixed real-time factor. Target: 4
     producers take at most 0.35 x the time of 1.
  2. Whisper ``tiny.en`` on a few minutes of English speech made with
     Piper: the recording fanned out to 1 node, then to 2 nodes (a process
     each, as on a real exchange); and the whole file as one job. The ratio
     2 vs 1, and the word error rate (against the text Piper spoke) of the
     stitched transcript vs the whole-file one (target: not worse by more
     than 1 point). On a 2-core machine the two Whisper nodes share the
     cores: expect little speed-up here; the point is that cutting costs
     no accuracy.

    PYTHONPATH=. .venv/bin/python bench/fanout.py [--quick] [--skip-whisper]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from privox.api.fanout import FanOut  # noqa: E402
from privox.api.farms import FarmExchange  # noqa: E402

RATE = 16000
#: A public-domain passage (the opening of Jerome K. Jerome's "Three Men in
#: a Boat", 1889), spoken by Piper paragraph after paragraph.
PASSAGE = [
    "There were four of us. George, and William Samuel Harris, and myself, and Montmorency."
    " We were sitting in my room, smoking, and talking about how bad we were.",
    "Bad from a medical point of view I mean, of course. We were all feeling seedy, and we"
    " were getting quite nervous about it.",
    "Harris said he felt such extraordinary fits of giddiness come over him at times, that"
    " he hardly knew what he was doing; and then George said that he had fits of giddiness"
    " too, and hardly knew what he was doing.",
    "With me, it was my liver that was out of order. I knew it was my liver that was out of"
    " order, because I had just been reading a patent liver pill circular.",
    "It is a most extraordinary thing, but I never read a patent medicine advertisement"
    " without being impelled to the conclusion that I am suffering from the particular"
    " disease therein dealt with in its most virulent form.",
    "I remember going to the British Museum one day to read up the treatment for some"
    " slight ailment of which I had a touch, hay fever, I fancy it was.",
    "I got down the book, and read all I came to read; and then, in an unthinking moment, I"
    " idly turned the leaves, and began to indolently study diseases, generally.",
    "I forget which was the first distemper I plunged into, some fearful, devastating"
    " scourge, I know, and, before I had glanced half down the list of premonitory"
    " symptoms, it was borne in upon me that I had fairly got it.",
]


def noiseRecording(seconds: float, seed: int = 7) -> bytes:
    """
    Noise bursts of 4 to 12 s with pauses of 0.3 to 1.5 s between them.
    """
    import numpy

    rng = numpy.random.default_rng(seed)
    parts = []
    total = 0
    while total < seconds * RATE:
        speech = int(rng.uniform(4, 12) * RATE)
        pause = int(rng.uniform(0.3, 1.5) * RATE)
        parts.append(rng.integers(-8000, 8000, speech, dtype=numpy.int16))
        parts.append(numpy.zeros(pause, dtype=numpy.int16))
        total += speech + pause
    return numpy.concatenate(parts)[: int(seconds * RATE)].astype("<i2").tobytes()


def piperSpeech(repeats: int) -> tuple[bytes, str]:
    """
    The passage spoken C{repeats} times by Piper (noise off), 16 kHz mono
    s16le with 0.4 s between paragraphs; and the text.
    """
    import numpy

    from privox.engines.audio import decodeAudio, toInt16
    from privox.engines.base import TTSJob
    from privox.engines.piper import PiperEngine

    engine = PiperEngine("en_US-joe-medium", None, deterministic=True)
    engine.load()
    pause = numpy.zeros(int(0.4 * RATE), dtype=numpy.int16)
    spoken = []
    for paragraph in PASSAGE:
        wav = engine.synthesize(TTSJob("piper:en_US-joe-medium", "en", None, paragraph))
        spoken.append(toInt16(decodeAudio(wav, "wav", RATE).samples))
        spoken.append(pause)
    once = numpy.concatenate(spoken)
    return numpy.tile(once, repeats).astype("<i2").tobytes(), " ".join(PASSAGE * repeats)


class Nodes:
    """
    Node processes (C{twistd privox-node}), killed at the end.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.processes: list[Any] = []

    async def start(self, name: str, sttPort: int, model: str, slots: int) -> None:
        from tests.test_e2e import ENV, REPO, TWISTD, WatchedProcess

        process = WatchedProcess(name)
        argv = [
            sys.executable, "-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-", "privox-node",
            "--stt-farm", f"tcp:host=127.0.0.1:port={sttPort}", "--stt", model,
            "--slots", str(slots), "--key", f"bench-{name}", "--retry-max", "0.5",
            "--shutdown-grace", "1",
        ]
        self.reactor.spawnProcess(process, sys.executable, argv, env=ENV, path=REPO)
        self.processes.append(process)
        await process.waitFor(b"serving stt through", timeout=120)

    async def stop(self) -> None:
        for process in self.processes:
            if process.reason is None and process.transport is not None:
                process.transport.signalProcess("KILL")
            await process.whenEnded()
        self.processes = []


async def producersJoined(reactor: Any, farm: Any, count: int) -> None:
    from privox.farm.sessions import ProducerSession
    from twisted.internet.task import deferLater

    for _ in range(600):
        if sum(isinstance(c.session, ProducerSession) for c in farm.farm.connections) >= count:
            return
        await deferLater(reactor, 0.1, lambda: None)
    raise RuntimeError(f"{count} producers did not join")


async def fannedOut(
    reactor: Any, nodes: list[tuple[str, int]], model: str, pcm: bytes, atOnce: int = 8
) -> tuple[float, Any]:
    """
    C{pcm} through a fresh farm with C{nodes} (name, slots) of C{model}:
    seconds taken and the stitched transcript. C{atOnce} 0: the whole
    file as one job.
    """
    from privox.wav import pcmToWav
    from tests.apifarms import LiveFarm

    farm = await LiveFarm("bench", queue_timeout=600.0).start()
    processes = Nodes(reactor)
    try:
        for name, slots in nodes:
            await processes.start(name, farm.port("stt"), model, slots)
        await producersJoined(reactor, farm, sum(slots for _, slots in nodes))
        exchange = FarmExchange(
            [farm.entry()], reactor, deadline=3600.0, rng=random.Random(1), poolSize=8
        )
        try:
            started = time.monotonic()
            if atOnce:
                fanout = FanOut(exchange, reactor, lambda f, *a: deferToThread(f, *a), atOnce)
                result = await fanout.transcribe(
                    pcm, model, "en", 3600.0, lambda seconds: 60 + seconds
                )
            else:
                result = await exchange.transcribe(model, "en", pcmToWav(pcm, RATE), "wav", 3600.0)
            return time.monotonic() - started, result
        finally:
            await exchange.stop()
    finally:
        await processes.stop()
        await farm.stop()


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


async def benchmark(reactor: Any, args: argparse.Namespace) -> None:
    from privox.api.fanout import cutPieces

    minutes = 3.0 if args.quick else 10.0
    pcm = noiseRecording(minutes * 60)
    pieces = await deferToThread(cutPieces, pcm)
    model = f"sleep:{args.rtf:g}"
    print(
        f"part 1: {minutes:g} min of noise bursts with pauses, {len(pieces)} pieces"
        f" ({min(p.seconds for p in pieces):.1f} to {max(p.seconds for p in pieces):.1f} s),"
        f" engine {model} (sleeps {args.rtf:g} s per second of audio)\n",
        flush=True,
    )
    rows = []
    times: dict[int, float] = {}
    for producers in (1, 2, 4):
        took, result = await fannedOut(reactor, [("sleepy", producers)], model, pcm)
        assert len(result.segments) == len(pieces), result
        times[producers] = took
        rows.append((
            f"{producers} producer{'s' if producers > 1 else ''}",
            f"{took:.1f}", f"{took / times[1]:.2f}", f"{minutes * 60 / took:.1f}x",
        ))
        print(f"  {rows[-1][0]}: {took:.1f} s", flush=True)
    ratio = times[4] / times[1]
    print()
    print(table(("sleep engine", "seconds", "vs 1", "real time"), rows))
    print(f"\n4 vs 1 producers: {ratio:.2f} (target <= 0.35: {'met' if ratio <= 0.35 else 'MISSED'})")

    if args.skip_whisper:
        return
    from tests.wer import wer

    repeats = 1 if args.quick else 2
    speech, text = await deferToThread(piperSpeech, repeats)
    seconds = len(speech) / 2 / RATE
    print(f"\npart 2: whisper:tiny.en on {seconds:.0f} s of Piper speech"
          f" ({len(await deferToThread(cutPieces, speech))} pieces)\n", flush=True)
    whisper = "whisper:tiny.en"
    runs = [
        ("whole file, 1 node", [("w1", 1)], 0),
        ("fanned out, 1 node", [("w1", 1)], 8),
        ("fanned out, 2 nodes", [("w1", 1), ("w2", 1)], 8),
    ]
    rows = []
    measured: dict[str, tuple[float, float]] = {}
    for name, nodes, atOnce in runs:
        took, result = await fannedOut(reactor, nodes, whisper, speech, atOnce)
        error = wer(text, result.text)
        measured[name] = (took, error)
        rows.append((name, f"{took:.1f}", f"{seconds / took:.1f}x", f"{error * 100:.1f}%"))
        print(f"  {name}: {took:.1f} s, WER {error * 100:.1f}%", flush=True)
    print()
    print(table(("whisper:tiny.en", "seconds", "real time", "WER"), rows))
    two, one = measured["fanned out, 2 nodes"][0], measured["fanned out, 1 node"][0]
    delta = (measured["fanned out, 2 nodes"][1] - measured["whole file, 1 node"][1]) * 100
    print(f"\n2 vs 1 nodes: {two / one:.2f} ({os.cpu_count()} cores)")
    print(f"WER stitched - whole: {delta:+.1f} points (target <= +1.0:"
          f" {'met' if delta <= 1.0 else 'MISSED'})")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 minutes, and less speech")
    parser.add_argument("--skip-whisper", action="store_true", help="part 1 only")
    parser.add_argument(
        "--rtf", type=float, default=0.05,
        help="the sleep engine's real-time factor (default 0.05: 10 min in 30 s)",
    )
    args = parser.parse_args(argv)

    def run(reactor: Any) -> Deferred[None]:
        return ensureDeferred(benchmark(reactor, args))

    react(run)


if __name__ == "__main__":
    main(sys.argv[1:])
