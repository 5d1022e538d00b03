"""
Cancelled work stops (issue 17): separate C{twistd privox-farm},
C{privox-node} (tiny.en and the Piper voice, one slot each) and
C{privox-api} processes. A request that outlives its deadline gets 504, its
farm cancels the job, and the node's engine stops within about a second:
the next request is served at once instead of waiting minutes behind work
nobody will read.
"""

from __future__ import annotations

import re
import time

import numpy as np
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from privox.engines.audio import encodeWav, toInt16
from tests.test_api_app import multipart
from tests.test_e2e import WatchedProcess, freePorts
from tests.test_faults import ProcessTestCase, figures
from tests.test_roundtrip import resample16k, speak
from tests.wer import wer

STT = "whisper:tiny.en"
TTS = "piper:en_US-joe-medium"
SENTENCE = "The weather today is sunny with a light breeze."
#: Speech that does not repeat within a Whisper window (a sentence said over
#: and over sends Whisper into its slow temperature fallback).
PARAGRAPH = (
    "The weather today is sunny with a light breeze. She sells fresh bread at the market"
    " every morning. Our train leaves the station at half past seven. Please remember to"
    " water the plants on the balcony. The museum opens its new exhibition next Thursday."
    " He fixed the old bicycle with a borrowed wrench. A quiet library is the best place to"
    " read. They painted the fence a bright shade of green. The children built a castle out"
    " of wet sand. We ordered soup and bread for lunch."
)
#: The API's whole deadline here: long enough for a short clip on a slow
#: machine, far too short for three minutes of audio.
DEADLINE = 6.0
#: How long a cancelled engine may go on after its job's deadline: Whisper
#: stops between 30-second windows, each about 2.6 s of tiny.en on this slow
#: 2-core machine (1.2 s on a usual one); Piper between sentences.
STOPS_WITHIN = 4.0


class CancelledWorkTests(ProcessTestCase):
    timeout = 240

    async def startExchange(self) -> tuple[WatchedProcess, str]:
        farm, sttPort, ttsPort = await self.startFarmProcess("cancel")
        node = self.spawn(
            "node", "privox-node", "--slots", "1", "--retry-max", "0.5",
            "--stt-farm", f"tcp:host=127.0.0.1:port={sttPort}", "--stt", STT,
            "--tts-farm", f"tcp:host=127.0.0.1:port={ttsPort}", "--tts", TTS,
        )
        for service in (b"stt", b"tts"):
            await node.waitFor(b"serving %s through" % service, timeout=90)
        port = freePorts(1)[0]
        api = self.spawn(
            "api", "privox-api", "--accounts", "none", "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--farm", f"f tcp:host=127.0.0.1:port={sttPort} tcp:host=127.0.0.1:port={ttsPort}",
            "--stt-model", f"fast {STT} {STT}", "--voice", f"voice1 {TTS}",
            "--deadline", str(DEADLINE), "--deadline-per-second", "0",
            "--e2e", "off",  # no account store to enrol its node with
            # One job, whole, so that its engine has work to be stopped in
            # (long audio cut into pieces: tests/test_fanout.py).
            "--fanout-above", "100000",
        )
        await api.waitFor(b"starting on %d" % port)
        return node, f"http://127.0.0.1:{port}"

    def engineSeconds(self, node: WatchedProcess, model: str) -> list[float]:
        """
        The engine time of each failed job of C{model}, from the node's log.
        """
        pattern = re.escape(model.encode()) + rb" failed: ([\d.]+) ms of engine time"
        return [float(ms) / 1000 for ms in re.findall(pattern, bytes(node.output))]

    async def test_deadlineStopsTheEngine(self) -> None:
        node, url = await self.startExchange()
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        clip = speak(SENTENCE)
        audio = resample16k(speak(PARAGRAPH))
        samples = np.tile(toInt16(audio.samples), int(180 / audio.seconds) + 1)
        long = encodeWav(samples, 16000)

        # Three minutes of speech: 504 at the deadline, and the engine stops.
        body, contentType = multipart({"key": "k"}, {"file": ("long.wav", long)})
        started = time.monotonic()
        response = await http.post(url + "/stt", data=body, headers={"Content-Type": contentType})
        reason = await response.text()
        self.assertEqual(response.code, 504, reason)
        self.assertIn(f"the deadline for {len(samples) / 16000:.1f} s of audio", reason)
        figures(f"a 3-minute upload: 504 after {time.monotonic() - started:.1f} s")

        # The next clip is served by the same (single) slot within its own deadline.
        body, contentType = multipart({"key": "k"}, {"file": ("clip.wav", clip)})
        started = time.monotonic()
        response = await http.post(url + "/stt", data=body, headers={"Content-Type": contentType})
        text = await response.text()
        took = time.monotonic() - started
        self.assertEqual(response.code, 200, text)
        self.assertLessEqual(wer(SENTENCE, text), 0.25, text)
        [spent] = self.engineSeconds(node, STT)
        figures(f"cancelled STT engine ran {spent:.2f} s; the next clip took {took:.2f} s")
        self.assertLess(spent, DEADLINE + STOPS_WITHIN)

        # TTS: a text that takes minutes to say stops between sentences.
        text = " ".join([PARAGRAPH] * 10)
        response = await http.post(url + "/tts", data={"key": "k", "text": text})
        self.assertEqual(response.code, 504, await response.text())
        started = time.monotonic()
        response = await http.post(url + "/tts", data={"key": "k", "text": "Hello there."})
        self.assertEqual(response.code, 200)
        await response.content()
        [spent] = self.engineSeconds(node, TTS)
        figures(
            f"cancelled TTS engine ran {spent:.2f} s; the next text took"
            f" {time.monotonic() - started:.2f} s"
        )
        self.assertLess(spent, DEADLINE + STOPS_WITHIN)
