"""
The stock OpenAI Python SDK against separate C{twistd} processes, as an
operator runs them: a farm, an API with accounts that seals every job (its
default), and a node with the bundled Whisper and Piper models that enrols
with it. Speech in mp3 and at other speeds (Piper paces it), decoded back
with PyAV; that speech transcribed back with timed segments and words. And
a long recording fanned out over two nodes, one SIGKILLed mid-way.
"""

from __future__ import annotations

import io
import json
import os
import signal

import av
import openai
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from privox.api.fanout import cutPieces
from privox.wav import pcmToWav
from tests.test_cli import privox
from tests.test_e2e import freePorts
from tests.test_faults import ProcessTestCase
from tests.test_fanout import RATE, SLEEP_MODEL, recording
from tests.wer import wer

SENTENCE = "Please remember to water the garden before the evening storm."
STT = "whisper:tiny.en"
TTS = "piper:en_US-joe-medium"


def seconds(audio: bytes) -> float:
    with av.open(io.BytesIO(audio)) as decoded:
        stream = decoded.streams.audio[0]
        return sum(frame.samples for frame in decoded.decode(audio=0)) / stream.rate


class OpenAIDaemonTests(ProcessTestCase):
    timeout = 240

    async def test_speechAndTranscription(self) -> None:
        root = FilePath(os.path.abspath(self.mktemp()))
        root.makedirs()
        dsn = "sqlite:" + root.child("accounts.sqlite3").path
        _, stt, tts = await self.startFarmProcess("sdk")
        [port] = freePorts(1)
        url = f"http://127.0.0.1:{port}"
        api = self.spawn(
            "api", "privox-api", "--accounts", dsn,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--farm", f"f tcp:host=127.0.0.1:port={stt} tcp:host=127.0.0.1:port={tts}",
            "--exchange-key", root.child("exchange.key").path,
            # OpenAI's names, on the models this node serves.
            "--stt-model", f"fast {STT}", "--voice", f"alloy {TTS}",
        )
        await api.waitFor(b"starting on %d" % port)
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        exchangeKey = json.loads(await (await http.get(url + "/v1/exchange")).text())["key"]
        out, err, code = await privox("keys", "create", "--label", "user", "--accounts", dsn)
        self.assertEqual(code, 0, err)
        key = out.splitlines()[-1]
        node = self.spawn(
            "node", "privox-node",
            "--stt-farm", f"tcp:host=127.0.0.1:port={stt}", "--stt", STT,
            "--tts-farm", f"tcp:host=127.0.0.1:port={tts}", "--tts", TTS,
            "--key", key, "--exchange", url, "--exchange-key", exchangeKey,
            "--state-dir", root.child("node").path, "--retry-max", "0.5",
            "--shutdown-grace", "1",
        )
        await node.waitFor(b"serving tts through", timeout=120)
        await node.waitFor(b"serving stt through", timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=1, timeout=60)

        def speak(**kwargs: object) -> tuple[bytes, str]:
            response = client.audio.speech.create(
                model="tts-1", voice="alloy", input=SENTENCE, **kwargs
            )
            return response.content, response.response.headers["content-type"]

        mp3, contentType = await deferToThread(speak)
        self.assertEqual(contentType, "audio/mpeg")
        own = seconds(mp3)
        self.assertGreater(own, 1.5)
        for speed in (0.5, 2.0, 4.0):
            paced, _ = await deferToThread(speak, response_format="wav", speed=speed)
            self.assertLess(abs(seconds(paced) * speed / own - 1), 0.15, speed)

        verbose = await deferToThread(
            client.audio.transcriptions.create, model="whisper-1", file=("speech.mp3", mp3),
            response_format="verbose_json", timestamp_granularities=["word", "segment"],
        )
        self.assertLessEqual(wer(SENTENCE, verbose.text), 0.25, verbose.text)
        self.assertGreaterEqual(len(verbose.segments), 1)
        self.assertEqual(" ".join(s.text for s in verbose.segments), verbose.text)
        times = [t for w in verbose.words for t in (w.start, w.end)]
        self.assertEqual(times, sorted(times))
        self.assertLessEqual(times[-1], verbose.duration + 0.01)
        self.assertGreater(len(verbose.words), 5)
        srt = await deferToThread(
            client.audio.transcriptions.create, model="whisper-1", file=("speech.mp3", mp3),
            response_format="srt",
        )
        self.assertEqual(srt.count(" --> "), len(verbose.segments))
        # Every job was sealed: the node enrolled, the farm relayed ciphertext.
        self.assertIn(b"enrolled with " + url.encode(), node.output)
        self.assertNotIn(SENTENCE.encode(), node.output)

    async def test_longRecordingNodeKilled(self) -> None:
        """
        Five minutes of audio through the SDK: cut into pieces that two
        nodes (the model-free sleep engine, two slots each) transcribe at
        once; one node is SIGKILLed as soon as it has finished a piece. Its
        pieces in flight are tried again on the other, and the answer has
        every piece, in order, at its place in the recording.
        """
        _, stt, tts = await self.startFarmProcess("long", None, "--queue-timeout", "20")
        nodes = []
        for name in ("doomed", "survivor"):
            node = self.spawn(
                f"node {name}", "privox-node",
                "--stt-farm", f"tcp:host=127.0.0.1:port={stt}", "--stt", SLEEP_MODEL,
                "--slots", "2", "--key", f"node-{name}", "--retry-max", "0.5",
                "--shutdown-grace", "1",
            )
            nodes.append(node)
        for node in nodes:
            await node.waitFor(b"serving stt through", timeout=60)
        doomed = nodes[0]
        [port] = freePorts(1)
        api = self.spawn(
            "api", "privox-api", "--accounts", "none", "--keys", "open",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--farm", f"f tcp:host=127.0.0.1:port={stt} tcp:host=127.0.0.1:port={tts}",
            "--stt-model", f"fast {SLEEP_MODEL}", "--e2e", "off", "--fanout", "4",
            "--exchange-key", os.path.abspath(self.mktemp()),
        )
        await api.waitFor(b"starting on %d" % port)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="any", max_retries=0, timeout=60
        )
        pcm = recording(*[("s", 24.0), ("q", 1.0)] * 12)
        pieces = cutPieces(pcm)
        self.assertEqual(len(pieces), 12)
        answered = deferToThread(
            client.audio.transcriptions.create, model="whisper-1",
            file=("long.wav", pcmToWav(pcm, RATE)), response_format="verbose_json",
        )
        await doomed.waitFor(SLEEP_MODEL.encode() + b" ok:", timeout=60)
        doomed.transport.signalProcess(signal.SIGKILL)
        verbose = await answered
        reason = await doomed.whenEnded()
        self.assertEqual(getattr(reason, "signal", None), signal.SIGKILL)
        self.assertEqual(verbose.duration, 300.0)
        self.assertEqual(
            [round(s.start, 2) for s in verbose.segments], [round(p.start, 2) for p in pieces]
        )
        self.assertEqual(
            [s.text.split()[-1] for s in verbose.segments],
            [f"seconds:{p.seconds:.2f}" for p in pieces],
        )
        self.assertEqual(verbose.text, " ".join(s.text for s in verbose.segments))
        # The killed node had pieces in flight: tried again elsewhere.
        self.assertIn(b"stt answered producer_lost", api.output)
        self.assertRegex(bytes(api.output), rb"fan-out: piece \d+ of 12 failed \(\w+\); trying again")
