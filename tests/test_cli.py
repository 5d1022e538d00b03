"""
The C{privox} command.

End to end: the real command, run as a subprocess (C{python -m privox.cli}),
against a L{LocalExchange} in this process (real sockets, the bundled Piper
and Whisper models, an allow-list of keys); C{caption} also with its stdout
on a pseudo-terminal, and against an API from before the live WebSocket.
Without the network: the VAD segmentation on synthetic PCM, argument
checking and error lines. (The caption's life: tests/test_caption.py.)
"""

from __future__ import annotations

import fcntl
import functools
import io
import json
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
import tty
import wave
from typing import Any, Callable

import numpy as np
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from privox.cli import parseArguments
from privox.client import httpProblem
from privox.engines.audio import decodeAudio, toInt16
from privox.local import LocalExchange, LocalSettings
from privox.utterances import Segmenter, Utterance, webrtcvadClassifier
from privox.wav import pcmToWav
from tests.test_roundtrip import speak
from tests.wer import wer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "cli-test-key"
MAX_WER = 0.25
RATE = 16000

FIRST = "The quick brown fox jumps over the lazy dog."
SECOND = "Please call me back when you get this message."


# -- helpers ------------------------------------------------------------------


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * RATE) * 2)


def loud(seconds: float, value: int = 3000) -> bytes:
    """
    Samples a classifier that calls any non-zero frame speech will call
    speech: a constant.
    """
    return np.full(int(seconds * RATE), value, "<i2").tobytes()


def voiced(seconds: float) -> bytes:
    """
    A vowel-like harmonic sound (140 Hz and its overtones, swelling at
    4 Hz), which webrtcvad calls speech.
    """
    t = np.arange(int(seconds * RATE)) / RATE
    x = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 20))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (x / np.abs(x).max() * 0.5 * 32767).astype("<i2").tobytes()


def nonZero(frame: bytes) -> bool:
    return any(frame)


@functools.cache
def spoken16k(text: str) -> bytes:
    """
    Piper saying C{text}, as the 16 kHz s16le PCM C{arecord} would give.
    """
    samples = decodeAudio(speak(text), "wav", RATE).samples
    return toInt16(samples).astype("<i2").tobytes()


def env(**extra: str) -> dict[str, str]:
    """
    The environment for the command: this checkout on the path, no
    C{PRIVOX_*} from the caller's shell.
    """
    out = {k: v for k, v in os.environ.items() if not k.startswith("PRIVOX_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    out.update(extra)
    return out


async def privox(*args: str, **environ: str) -> tuple[str, str, int]:
    """
    Run C{privox ARGS} with stdin closed; its stdout, stderr and exit status.
    """
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "privox.cli", *args], env=env(**environ), path=REPO, reactor=reactor
    )
    return out.decode("utf-8"), err.decode("utf-8"), code


class _Feeder(ProcessProtocol):
    """
    Writes C{data} to the command's stdin, then closes it (or, with
    C{onOutput}, keeps it open and lets C{onOutput} act on what is printed);
    C{ended} fires with stdout, stderr and the exit status.
    """

    def __init__(
        self, data: bytes, onOutput: Callable[[_Feeder, bytes], None] | None = None
    ) -> None:
        self.data = data
        self.onOutput = onOutput
        self.out = b""
        self.err = b""
        self.ended: Deferred[tuple[str, str, int | None]] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        if self.onOutput is None:
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self.onOutput is not None:
            self.onOutput(self, self.out)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        reason.trap(ProcessDone, ProcessTerminated)
        code = reason.value.exitCode
        if code is None:  # killed by a signal
            code = -reason.value.signal
        self.ended.callback((self.out.decode("utf-8"), self.err.decode("utf-8"), code))


async def caption(
    pcm: bytes,
    *args: str,
    onOutput: Callable[[_Feeder, bytes], None] | None = None,
    **environ: str,
) -> tuple[str, str, int | None]:
    """
    Run C{privox caption ARGS} with C{pcm} on its stdin.
    """
    feeder = _Feeder(pcm, onOutput)
    reactor.spawnProcess(
        feeder,
        sys.executable,
        [sys.executable, "-m", "privox.cli", "caption", *args],
        env=env(**environ),
        path=REPO,
    )
    return await feeder.ended


async def closedPort() -> int:
    """
    A local port nothing listens on (any more).
    """
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    return number


def onATerminal(
    pcm: bytes, environ: dict[str, str], *args: str
) -> tuple[list[tuple[float, bytes]], str, int, float]:
    """
    Run C{privox caption ARGS} with its stdout on a pseudo-terminal (200
    columns) and C{pcm} written to its stdin at real-time pace, 100 ms at a
    time: what the terminal got (each read with the seconds since the audio
    began), stderr, the exit status and when it exited. It blocks: run it
    in a thread.
    """
    master, slave = pty.openpty()
    tty.setraw(slave)  # the bytes as written: no \n made \r\n
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "privox.cli", "caption", *args],
        stdin=subprocess.PIPE, stdout=slave, stderr=subprocess.PIPE, env=environ, cwd=REPO,
    )
    os.close(slave)
    assert process.stdin is not None and process.stderr is not None
    reads: list[tuple[float, bytes]] = []
    start = time.monotonic()

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the command let go of the terminal
                return
            if not data:
                return
            reads.append((time.monotonic() - start, data))

    reader = threading.Thread(target=read)
    reader.start()
    chunk = RATE // 10 * 2
    try:
        for n, at in enumerate(range(0, len(pcm), chunk)):
            delay = start + n * 0.1 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            process.stdin.write(pcm[at : at + chunk])
            process.stdin.flush()
        process.stdin.close()
        err = process.stderr.read().decode("utf-8")
        code = process.wait(timeout=120)
        exited = time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(10)
        os.close(master)
    return reads, err, code, exited


#: What C{privox caption} writes to a terminal: the line erased, a
#: hypothesis drawn dim, a final line.
_DRAWN = re.compile(
    rb"(?P<erase>\r\x1b\[2K)|\x1b\[2m(?P<partial>[^\x1b]*)\x1b\[0m|(?P<line>[^\r\x1b\n]*)\n"
)


def drawn(output: bytes) -> list[tuple[str, str]]:
    """
    What a terminal showed, in order: C{("partial", text)} for each
    hypothesis drawn in place, C{("line", text)} for each final line.

    @raise ValueError: anything else, or something written over a
        hypothesis without erasing it first.
    """
    shown: list[tuple[str, str]] = []
    at = 0
    erased, dirty = False, False
    for match in _DRAWN.finditer(output):
        if match.start() != at:
            break
        at = match.end()
        if match["erase"] is not None:
            erased, dirty = True, False
        elif match["partial"] is not None:
            if not erased:
                raise ValueError(f"a hypothesis drawn over the line: {output[:at]!r}")
            shown.append(("partial", match["partial"].decode("utf-8")))
            erased, dirty = False, True
        else:
            if dirty:
                raise ValueError(f"a line written over a hypothesis: {output[:at]!r}")
            shown.append(("line", match["line"].decode("utf-8")))
            erased = False
    if at != len(output):
        raise ValueError(f"unexpected output: {output[at : at + 60]!r}")
    return shown


# -- against a running local exchange ---------------------------------------------


class CommandTests(TestCase):
    """
    The three commands against a local exchange with the bundled models,
    which takes one key (L{KEY}) from an allow-list file.
    """

    timeout = 240

    def setUp(self) -> Deferred[None]:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        keys = os.path.join(self.folder, "keys.txt")
        with open(keys, "w") as f:
            f.write(f"# the only key\n{KEY}\n")
        self.local = LocalExchange(LocalSettings(port=0, accounts="none", keys=keys), reactor)
        self.local.startService()
        self.addCleanup(self.local.stopService)
        return self.local.ready

    def run_(self, *args: str) -> Deferred[tuple[str, str, int]]:
        return Deferred.fromCoroutine(privox(*args, PRIVOX_API=self.local.url, PRIVOX_KEY=KEY))

    async def test_ttsThenStt(self) -> None:
        """
        C{privox tts} writes a WAV file and says where and how long;
        C{privox stt} on it prints the words, or the API's JSON.
        """
        wav = os.path.join(self.folder, "fox.wav")
        out, err, code = await self.run_("tts", FIRST, "-o", wav, "--voice", "voice1")
        self.assertEqual((code, err), (0, ""))
        with wave.open(wav) as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth()), (1, 2))
            duration = w.getnframes() / w.getframerate()
        self.assertGreater(duration, 1.0)
        self.assertEqual(out, f"wrote {wav}: {duration:.2f} s of audio at 22050 Hz\n")

        out, err, code = await self.run_("stt", wav, "--quality", "fast", "--language", "en")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.count("\n"), 1)
        self.assertLessEqual(wer(FIRST, out), MAX_WER, out)

        out, err, code = await self.run_("stt", wav, "--json")
        self.assertEqual((code, err), (0, ""))
        answer = json.loads(out)
        self.assertEqual((answer["model"], answer["language"]), ("whisper:tiny.en", "en"))
        self.assertLessEqual(wer(FIRST, answer["text"]), MAX_WER, answer)

    async def test_caption(self) -> None:
        """
        Two utterances separated by 1.5 s of silence on stdin: two lines, in
        order, then exit 0 at the end of input.
        """
        pcm = (
            silence(0.5) + spoken16k(FIRST) + silence(1.5) + spoken16k(SECOND) + silence(1.0)
        )
        out, err, code = await caption(pcm, PRIVOX_API=self.local.url, PRIVOX_KEY=KEY)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, out)
        self.assertLessEqual(wer(FIRST, lines[0]), MAX_WER, lines)
        self.assertLessEqual(wer(SECOND, lines[1]), MAX_WER, lines)
        # Into a pipe: the finals only, no control characters.
        self.assertIsNone(re.search(r"[\x00-\x09\x0b-\x1f\x7f]", out), repr(out))

    async def test_captionWhole(self) -> None:
        """
        C{--whole}: utterances cut on silence here, each transcribed whole.
        """
        pcm = (
            silence(0.5) + spoken16k(FIRST) + silence(1.5) + spoken16k(SECOND) + silence(1.0)
        )
        out, err, code = await caption(pcm, "--whole", PRIVOX_API=self.local.url, PRIVOX_KEY=KEY)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, out)
        self.assertLessEqual(wer(FIRST, lines[0]), MAX_WER, lines)
        self.assertLessEqual(wer(SECOND, lines[1]), MAX_WER, lines)

    async def test_captionOnATerminal(self) -> None:
        """
        stdout on a terminal, the audio at real-time pace: while each
        utterance is said its hypothesis is drawn in place, then its final
        replaces it as a line.
        """
        lead, pause = 0.5, 1.5
        pcm = (
            silence(lead) + spoken16k(FIRST) + silence(pause) + spoken16k(SECOND) + silence(1.0)
        )
        reads, err, code, exited = await deferToThread(
            onATerminal, pcm, env(PRIVOX_API=self.local.url, PRIVOX_KEY=KEY, TERM="xterm")
        )
        self.assertEqual((code, err), (0, ""))
        shown = drawn(b"".join(data for _, data in reads))
        kinds = [kind for kind, _ in shown]
        lines = [text for kind, text in shown if kind == "line"]
        self.assertEqual(len(lines), 2, shown)
        self.assertLessEqual(wer(FIRST, lines[0]), MAX_WER, shown)
        self.assertLessEqual(wer(SECOND, lines[1]), MAX_WER, shown)
        first = kinds.index("line")
        self.assertIn("partial", kinds[:first], shown)
        self.assertIn("partial", kinds[first + 1 :], shown)

        def when(marker: bytes) -> float:
            for seconds, data in reads:
                if marker in data:
                    return seconds
            return math.nan

        firstPartial = when(b"\x1b[2m") - lead
        firstFinal = when(b"\n") - (lead + len(spoken16k(FIRST)) / 2 / RATE)
        audioEnds = len(pcm) / 2 / RATE
        print(
            f"\n{kinds.count('partial')} hypotheses drawn; the first {firstPartial:.2f} s after"
            f" speech began; the first final {firstFinal:.2f} s after its sentence ended; the"
            f" last {reads[-1][0] - audioEnds:+.2f} s and the exit {exited - audioEnds:+.2f} s"
            " after the audio ended"
        )

    async def test_captionInterrupted(self) -> None:
        """
        Ctrl-C ends capture like the end of input: the utterance under way
        is still transcribed and printed, and the command exits 0. (The
        command reads the whole pipe within milliseconds; the first line
        takes a transcription.)
        """
        pcm = spoken16k(FIRST) + silence(1.5) + spoken16k(SECOND) + silence(0.3)

        def interruptAfterFirstLine(feeder: _Feeder, out: bytes) -> None:
            if out.count(b"\n") == 1:
                feeder.transport.signalProcess("INT")

        out, err, code = await caption(
            pcm, onOutput=interruptAfterFirstLine, PRIVOX_API=self.local.url, PRIVOX_KEY=KEY
        )
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, out)
        self.assertLessEqual(wer(FIRST, lines[0]), MAX_WER, lines)
        self.assertLessEqual(wer(SECOND, lines[1]), MAX_WER, lines)

    async def test_refusals(self) -> None:
        """
        A key the exchange does not take: the API's 401 reason on one line,
        exit 1, and no file written by C{tts}; other HTTP errors likewise,
        with their status.
        """
        wav = os.path.join(self.folder, "hello.wav")
        with open(wav, "wb") as f:
            f.write(speak("Hello there."))
        refused = "privox: the key was not accepted (HTTP 401)\n"

        out, err, code = await privox("stt", wav, "--key", "wrong", PRIVOX_API=self.local.url)
        self.assertEqual((out, err, code), ("", refused, 1))
        # No key at all, where the API wants one: its reason, not ours.
        out, err, code = await privox("stt", wav, PRIVOX_API=self.local.url)
        self.assertEqual((out, code), ("", 1))
        self.assertEqual(
            err,
            "privox: a key is required: send a key field or Authorization: Bearer KEY (HTTP 401)\n",
        )

        # No WAV file is written from an error.
        target = os.path.join(self.folder, "refused.wav")
        out, err, code = await privox(
            "tts", "Hello.", "-o", target, PRIVOX_API=self.local.url, PRIVOX_KEY="wrong"
        )
        self.assertEqual((out, err, code), ("", refused, 1))
        self.assertFalse(os.path.exists(target))
        self.assertEqual(sorted(os.listdir(self.folder)), ["hello.wav", "keys.txt"])

        out, err, code = await caption(
            silence(0.3) + spoken16k(FIRST) + silence(1.0),
            PRIVOX_API=self.local.url,
            PRIVOX_KEY="wrong",
        )
        self.assertEqual((out, err, code), ("", refused, 1))

        # Other errors: the API's reason and the status.
        empty = os.path.join(self.folder, "empty.wav")
        open(empty, "wb").close()
        out, err, code = await self.run_("stt", empty)
        self.assertEqual(
            (out, err, code), ("", "privox: the uploaded file is empty (HTTP 400)\n", 1)
        )
        out, err, code = await self.run_("stt", wav, "--language", "e!")
        self.assertEqual(code, 1)
        self.assertEqual(err.splitlines(), [
            "privox: unknown language 'e!': give a language name or code, such as English, en,"
            " German or de (HTTP 422)"
        ])


# -- errors before any request succeeds ---------------------------------------------


class ErrorTests(TestCase):
    timeout = 60

    async def test_unreachable(self) -> None:
        """
        Nothing listening at C{--api}: one line naming the URL, exit 1.
        """
        api = f"http://127.0.0.1:{await closedPort()}"
        line = f"privox: cannot reach the Privox API at {api}: connection refused\n"
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        wav = os.path.join(folder, "tone.wav")
        with open(wav, "wb") as f:
            f.write(pcmToWav(voiced(1.0), RATE))

        self.assertEqual(await privox("stt", wav, "--api", api, "--key", KEY), ("", line, 1))
        target = os.path.join(folder, "out.wav")
        self.assertEqual(
            await privox("tts", "Hello.", "-o", target, PRIVOX_API=api, PRIVOX_KEY=KEY),
            ("", line, 1),
        )
        self.assertFalse(os.path.exists(target))
        self.assertEqual(
            await caption(silence(0.5) + voiced(1.0) + silence(1.0), "--api", api, "--key", KEY),
            ("", line, 1),
        )

    async def test_noAnswer(self) -> None:
        """
        An API that takes the request and never answers: C{--timeout}.
        """
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        api = f"http://127.0.0.1:{port.getHost().port}"
        wav = os.path.join(os.path.abspath(self.mktemp()) + ".wav")
        with open(wav, "wb") as f:
            f.write(pcmToWav(voiced(1.0), RATE))
        self.assertEqual(
            await privox("stt", wav, "--api", api, "--key", KEY, "--timeout", "0.5"),
            ("", f"privox: no answer from the Privox API at {api} within 0.5 s\n", 1),
        )

    async def test_missingFile(self) -> None:
        """
        A file that is not there is reported before the API is called.
        """
        missing = os.path.join(os.path.abspath(self.mktemp()), "missing.wav")
        api = f"http://127.0.0.1:{await closedPort()}"
        self.assertEqual(
            await privox("stt", missing, "--api", api, "--key", KEY),
            ("", f"privox: cannot read {missing}: No such file or directory\n", 1),
        )
        nowhere = os.path.join(os.path.abspath(self.mktemp()), "out.wav")
        out, err, code = await privox("tts", "Hello.", "-o", nowhere, "--api", api, "--key", KEY)
        self.assertEqual((out, code), ("", 1))
        self.assertTrue(err.startswith(f"privox: cannot write {nowhere}: no folder "), err)

    async def test_usage(self) -> None:
        """
        Usage errors (no key, a bad choice, no command) exit 2.
        """
        out, err, code = await privox("stt", "x.wav", "--quality", "perfect", "--key", KEY)
        self.assertEqual((out, code), ("", 2))
        self.assertIn("invalid choice: 'perfect'", err)
        out, err, code = await privox("caption", "--frame-ms", "25", "--key", KEY)
        self.assertEqual((out, code), ("", 2))
        out, err, code = await privox()
        self.assertEqual((out, code), ("", 2))


class OldApi(Resource):
    """
    An API from before C{/v1/realtime}: 404 there; C{POST /stt} answers
    the same transcript whatever it hears.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def render(self, request: Any) -> bytes:
        self.paths.append(request.path.decode())
        if request.method == b"POST" and request.path == b"/stt":
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"hello from an old API\n"
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"not found\n"


class OldApiTests(TestCase):
    timeout = 60

    async def test_fallBack(self) -> None:
        """
        An API without the live WebSocket: utterances are cut here, and
        each is transcribed whole.
        """
        api = OldApi()
        port = reactor.listenTCP(0, Site(api), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        pcm = silence(0.5) + voiced(1.0) + silence(1.5) + voiced(1.0) + silence(1.0)
        out, err, code = await caption(pcm, "--api", url, "--key", KEY)
        self.assertEqual((out, err, code), ("hello from an old API\n" * 2, "", 0))
        self.assertEqual(api.paths, ["/v1/realtime", "/stt", "/stt"])


# -- without the network ------------------------------------------------------------


class SegmenterTests(SynchronousTestCase):
    """
    L{Segmenter} with a classifier that calls any non-zero frame speech, so
    the boundaries are exact.
    """

    def segment(self, pcm: bytes, chunk: int | None = None, **kwargs: Any) -> list[Utterance]:
        segmenter = Segmenter(nonZero, **kwargs)
        step = chunk or len(pcm) or 1
        found = []
        for offset in range(0, len(pcm), step):
            found += segmenter.feed(pcm[offset : offset + step])
        return found + segmenter.finish()

    def spans(self, utterances: list[Utterance]) -> list[tuple[float, float]]:
        return [(round(u.start, 3), round(u.end, 3)) for u in utterances]

    def test_silence(self) -> None:
        self.assertEqual(self.segment(silence(5.0)), [])
        self.assertEqual(self.segment(b""), [])

    def test_oneUtterance(self) -> None:
        """
        Speech from 0.6 s to 1.5 s: the utterance takes 0.18 s (6 frames
        of 30 ms, the padding) either side, and exactly those samples.
        """
        pcm = silence(0.6) + loud(0.9) + silence(2.0)
        [utterance] = self.segment(pcm)
        self.assertEqual(self.spans([utterance]), [(0.42, 1.68)])
        self.assertEqual(utterance.pcm, pcm[int(0.42 * RATE) * 2 : int(1.68 * RATE) * 2])

    def test_silenceSplits(self) -> None:
        """
        A pause of at least C{silenceMs} splits; a shorter one does not.
        """
        long = silence(0.3) + loud(0.6) + silence(0.9) + loud(0.6) + silence(1.0)
        self.assertEqual(self.spans(self.segment(long)), [(0.12, 1.08), (1.62, 2.58)])
        short = silence(0.3) + loud(0.6) + silence(0.45) + loud(0.6) + silence(1.0)
        self.assertEqual(self.spans(self.segment(short)), [(0.12, 2.13)])
        self.assertEqual(
            self.spans(self.segment(short, silenceMs=300)), [(0.12, 1.08), (1.17, 2.13)]
        )

    def test_chunkingDoesNotMatter(self) -> None:
        pcm = silence(0.25) + loud(0.61) + silence(0.77) + loud(0.33) + silence(0.1)
        whole = self.segment(pcm)
        self.assertEqual(len(whole), 2)
        for chunk in (1, 2, 7, 961, 4096):
            pieces = self.segment(pcm, chunk)
            self.assertEqual([(u.start, u.pcm) for u in pieces], [(u.start, u.pcm) for u in whole])

    def test_endOfInputFlushes(self) -> None:
        """
        Input ending mid-utterance still gives it, with what padding there is.
        """
        pcm = silence(0.3) + loud(0.6) + silence(0.1) + b"\x01\x00" * 7
        self.assertEqual(self.spans(self.segment(pcm)), [(0.12, 0.99)])

    def test_maxSeconds(self) -> None:
        """
        Speech longer than C{maxSeconds} is cut into pieces of that length.
        """
        pcm = loud(5.0) + silence(1.0)
        spans = self.spans(self.segment(pcm, frameMs=20, maxSeconds=2.0))
        self.assertEqual(spans, [(0.0, 2.0), (2.0, 4.0), (4.0, 5.2)])

    def test_clicksAreDropped(self) -> None:
        """
        Less than C{minSpeechMs} of speech is not an utterance.
        """
        pcm = silence(0.5) + loud(0.06) + silence(1.0) + loud(0.03) + silence(0.1)
        self.assertEqual(self.segment(pcm), [])
        self.assertEqual(len(self.segment(pcm, minSpeechMs=60)), 1)

    def test_frameLengths(self) -> None:
        pcm = silence(0.3) + loud(0.6) + silence(1.0)
        for frameMs in (10, 20, 30):
            [utterance] = self.segment(pcm, frameMs=frameMs, paddingMs=120)
            self.assertEqual(self.spans([utterance]), [(0.18, 1.02)])
        self.assertRaises(ValueError, Segmenter, nonZero, frameMs=25)
        self.assertRaises(ValueError, Segmenter, nonZero, silenceMs=0)

    def test_noPadding(self) -> None:
        pcm = silence(0.3) + loud(0.6) + silence(1.0)
        self.assertEqual(self.spans(self.segment(pcm, paddingMs=0)), [(0.3, 0.9)])

    def test_wav(self) -> None:
        utterance = Utterance(loud(0.5), 1.0)
        with wave.open(io.BytesIO(utterance.wav())) as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth(), w.getframerate()), (1, 2, RATE))
            self.assertEqual(w.readframes(w.getnframes()), utterance.pcm)
        self.assertEqual((utterance.duration, utterance.end), (0.5, 1.5))


class WebrtcvadTests(SynchronousTestCase):
    """
    The real classifier on synthetic sound: digital silence and a
    vowel-like harmonic tone.
    """

    def test_boundaries(self) -> None:
        pcm = silence(1.0) + voiced(1.0) + silence(1.5) + voiced(0.8) + silence(1.5)
        segmenter = Segmenter(webrtcvadClassifier(2))
        utterances = segmenter.feed(pcm) + segmenter.finish()
        self.assertEqual(len(utterances), 2)
        # Within a few frames of speech +- 0.2 s padding (webrtcvad holds
        # on to speech a little after it stops).
        expected = [(0.8, 2.2), (3.3, 4.5)]
        for utterance, (start, end) in zip(utterances, expected):
            self.assertLessEqual(abs(utterance.start - start), 0.1, utterances)
            self.assertLessEqual(abs(utterance.end - end), 0.25, utterances)

    def test_silenceAlone(self) -> None:
        segmenter = Segmenter(webrtcvadClassifier(3))
        self.assertEqual(segmenter.feed(silence(3.0)) + segmenter.finish(), [])


class ArgumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.patch(sys, "stdin", io.StringIO())  # not a terminal

    def usageError(self, argv: list[str], environ: dict[str, str] | None = None) -> str:
        error = self.assertRaises(SystemExit, parseArguments, argv, environ or {})
        self.assertEqual(error.code, 2)
        return self.stderr.getvalue()

    def test_defaults(self) -> None:
        args = parseArguments(["stt", "a.wav", "--key", "k"], {})
        self.assertEqual(
            (args.api, args.key, args.timeout, args.quality, args.language, args.json),
            ("http://127.0.0.1:8080", "k", 120.0, None, None, False),
        )
        args = parseArguments(["caption"], {"PRIVOX_KEY": "k", "PRIVOX_API": "https://x.example/"})
        self.assertEqual(
            (args.api, args.key, args.aggressiveness, args.frame_ms, args.silence_ms),
            ("https://x.example", "k", 2, 30, 600),
        )
        self.assertEqual((args.max_seconds, args.padding_ms, args.whole), (30.0, 200, False))
        self.assertTrue(parseArguments(["caption", "--whole"], {}).whole)
        args = parseArguments(
            ["tts", "Hi", "-o", "x.wav", "--voice", "voice2", "--api", "http://h:1"],
            {"PRIVOX_KEY": "k", "PRIVOX_API": "http://ignored"},
        )
        self.assertEqual(
            (args.api, args.text, args.output, args.voice),
            ("http://h:1", "Hi", "x.wav", "voice2"),
        )

    def test_optionsBeforeTheCommand(self) -> None:
        """
        --api, --key and --timeout may come before the command; after it
        they win.
        """
        args = parseArguments(
            ["--api", "http://h:1/", "--key", "k", "--timeout", "5", "status"],
            {"PRIVOX_API": "http://ignored"},
        )
        self.assertEqual((args.api, args.key, args.timeout), ("http://h:1", "k", 5.0))
        args = parseArguments(["--api", "http://h:1", "stt", "a.wav", "--api", "http://g:2"], {})
        self.assertEqual(args.api, "http://g:2")
        error = self.usageError(["--api", "localhost:8080", "status"])
        self.assertIn("--api must be an http:// or https:// URL", error)

    def test_noKeyIsAnonymous(self) -> None:
        """
        Without a key (or with a blank one) requests go without one: the API
        decides whether anonymous use is allowed.
        """
        for environ in ({}, {"PRIVOX_KEY": " "}):
            self.assertIsNone(parseArguments(["stt", "a.wav"], environ).key)
        self.assertEqual(parseArguments(["stt", "a.wav", "--key", " k "], {}).key, "k")

    def test_badApi(self) -> None:
        error = self.usageError(["stt", "a", "--key", "k", "--api", "localhost:8080"])
        self.assertIn("--api must be an http:// or https:// URL", error)

    def test_badChoices(self) -> None:
        for argv in (
            ["caption", "--key", "k", "--aggressiveness", "4"],
            ["caption", "--key", "k", "--frame-ms", "40"],
            ["caption", "--key", "k", "--silence-ms", "0"],
            ["caption", "--key", "k", "--max-seconds", "-1"],
            ["stt", "a.wav", "--key", "k", "--timeout", "0"],
            ["stt", "a.wav", "--key", "k", "--quality", "perfect"],
            ["tts", "text", "--key", "k"],
            ["tts", "  ", "-o", "x.wav", "--key", "k"],
        ):
            self.usageError(argv)

    def test_captionFromATerminal(self) -> None:
        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        self.patch(sys, "stdin", Terminal())
        self.assertIn("pipe audio into it", self.usageError(["caption", "--key", "k"]))


class HttpProblemTests(SynchronousTestCase):
    def problem(self, code: int, body: bytes, contentType: str, **headers: str) -> str:
        from twisted.web.http_headers import Headers

        class Response:
            pass

        response = Response()
        response.code = code  # type: ignore[attr-defined]
        response.headers = Headers(  # type: ignore[attr-defined]
            {"Content-Type": [contentType], **{k: [v] for k, v in headers.items()}}
        )
        return httpProblem(response, body)

    def test_shapes(self) -> None:
        self.assertEqual(
            self.problem(401, b"the key was not accepted\n", "text/plain; charset=utf-8"),
            "the key was not accepted (HTTP 401)",
        )
        self.assertEqual(
            self.problem(
                503, b'{"error": {"message": "no capacity"}}', "application/json",
                **{"Retry-After": "5"},
            ),
            "no capacity (HTTP 503; retry after 5 s)",
        )
        self.assertEqual(
            self.problem(502, b"<html>\n<b>Bad</b></html>", "text/html"), "bad gateway (HTTP 502)"
        )
        self.assertEqual(self.problem(404, b"", "text/plain"), "not found (HTTP 404)")
