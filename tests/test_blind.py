"""
A blind farm (issue 19, docs/privacy.rst): separate C{twistd privox-farm},
C{privox-api --e2e required} and C{privox-node} processes, the node enrolled
with the API's exchange, and a tap that records every byte between the farm
and its peers. An STT and a TTS job succeed while no content crosses the
farm in the clear: no word of the text or of the transcript (UTF-8, UTF-16),
no slice of the audio in or out. The same tap, with an API that does not
seal, finds them: the check sees what it looks for.
"""

from __future__ import annotations

import io
import json
import os
import wave

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols.portforward import ProxyClient, ProxyClientFactory, ProxyFactory, ProxyServer
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from tests.test_cli import privox
from tests.test_e2e import REPO, freePorts
from tests.test_faults import ProcessTestCase
from tests.wer import wer

NODE_CONFIG = os.path.join(REPO, "etc", "privox-node.toml")
SENTENCE = "Please remember to water the garden before the evening storm."
#: Spoken second, on the connection that sealed the first: its text goes
#: sealed early, with the JOB_, for the node that spoke the first.
AGAIN = "Thursday's meeting moved upstairs, bring the quarterly figures."
VOICE = "piper:en_US-joe-medium"


class Tap:
    """
    TCP proxies in front of a farm's ports, keeping every byte that passes
    in either direction.
    """

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def bytes(self) -> bytes:
        return b"".join(self.seen)

    async def listen(self, port: int) -> int:
        tap = self

        class Recording(ProxyClient):
            def dataReceived(self, data: bytes) -> None:
                tap.seen.append(data)
                super().dataReceived(data)

        class RecordingClientFactory(ProxyClientFactory):
            protocol = Recording

        class RecordingServer(ProxyServer):
            clientProtocolFactory = RecordingClientFactory

            def dataReceived(self, data: bytes) -> None:
                tap.seen.append(data)
                super().dataReceived(data)

        factory = ProxyFactory("127.0.0.1", port)
        factory.protocol = RecordingServer
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.ports = getattr(self, "ports", []) + [listening]
        return listening.getHost().port

    async def stop(self) -> None:
        for port in getattr(self, "ports", []):
            await port.stopListening()


def pcm(wav: bytes) -> bytes:
    with wave.open(io.BytesIO(wav)) as w:
        return w.readframes(w.getnframes())


def slices(data: bytes, width: int = 32, count: int = 16) -> list[bytes]:
    """
    C{count} windows of C{width} bytes from the middle half of C{data}
    (not silence: a run of zeros would be found anywhere).
    """
    start, end = len(data) // 4, 3 * len(data) // 4
    step = max(1, (end - start) // count)
    return [
        data[i : i + width]
        for i in range(start, end - width, step)
        if len(set(data[i : i + width])) > 8
    ][:count]


def spellings(text: str) -> list[bytes]:
    words = [w.strip(".,").lower() for w in text.split() if len(w.strip(".,")) >= 5]
    out = []
    for word in words:
        for form in (word, word.capitalize()):
            out += [form.encode("utf-8"), form.encode("utf-16-le"), form.encode("utf-16-be")]
    return out


class BlindFarmTests(ProcessTestCase):
    timeout = 240

    async def test_noContentCrossesTheFarm(self) -> None:
        root = FilePath(os.path.abspath(self.mktemp()))
        root.makedirs()
        dsn = "sqlite:" + root.child("accounts.sqlite3").path
        _, sttFarm, ttsFarm = await self.startFarmProcess("blind")
        tap = Tap()
        self.addCleanup(tap.stop)
        sttTap, ttsTap = await tap.listen(sttFarm), await tap.listen(ttsFarm)

        async def startApi(name: str, e2e: str) -> str:
            [port] = freePorts(1)
            api = self.spawn(
                name, "privox-api", "--accounts", dsn,
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--farm", f"tap tcp:host=127.0.0.1:port={sttTap} tcp:host=127.0.0.1:port={ttsTap}",
                "--exchange-key", root.child("exchange.key").path, "--e2e", e2e,
                "--stt-model", "fast whisper:tiny.en whisper:tiny.en",
                "--voice", f"voice1 {VOICE}",
            )
            await api.waitFor(b"starting on %d" % port)
            return f"http://127.0.0.1:{port}"

        url = await startApi("api", "required")
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        exchangeKey = json.loads(await (await http.get(url + "/v1/exchange")).text())["key"]

        async def newKey() -> str:
            out, err, code = await privox("keys", "create", "--accounts", dsn)
            self.assertEqual(code, 0, err)
            return out.splitlines()[-1]

        nodeKey, userKey = await newKey(), await newKey()
        node = self.spawn(
            "node", "privox-node", "--config", NODE_CONFIG,
            "--stt-farm", f"tcp:host=127.0.0.1:port={sttTap}",
            "--tts-farm", f"tcp:host=127.0.0.1:port={ttsTap}",
            "--key", nodeKey, "--exchange", url, "--exchange-key", exchangeKey,
            "--state-dir", root.child("node-state").path, "--retry-max", "0.5",
            "--shutdown-grace", "1",
        )
        await node.waitFor(b"enrolled with", timeout=60)
        await node.waitFor(b"serving stt through", timeout=60)
        await node.waitFor(b"serving tts through", timeout=60)

        # TTS, then that speech back through STT: both sealed.
        response = await http.post(url + "/tts", data={"key": userKey, "text": SENTENCE, "voice": "voice1"})
        spoken = await response.content()
        self.assertEqual(response.code, 200, spoken[:200])
        response = await http.post(
            url + "/stt", data={"key": userKey, "quality": "fast"},
            files={"file": ("speech.wav", "audio/wav", io.BytesIO(spoken))},
        )
        transcript = (await response.content()).decode()
        self.assertEqual(response.code, 200, transcript)
        self.assertLessEqual(wer(SENTENCE, transcript), 0.25, transcript)
        response = await http.post(url + "/tts", data={"key": userKey, "text": AGAIN, "voice": "voice1"})
        again = await response.content()
        self.assertEqual(response.code, 200, again[:200])

        recorded = tap.bytes()
        self.assertGreater(len(recorded), len(spoken))  # the audio went through, twice
        self.assertIn(b'"for":"', recorded)  # the second text went sealed early
        secrets = (spellings(SENTENCE) + spellings(transcript) + slices(pcm(spoken))
                   + spellings(AGAIN) + slices(pcm(again)))
        self.assertGreater(len(secrets), 30)
        leaked = [s for s in secrets if s in recorded]
        self.assertEqual(leaked, [])

        # The control: an API that does not seal, the same tap.
        clear = await startApi("clear api", "off")
        tap.seen.clear()
        response = await http.post(clear + "/tts", data={"key": userKey, "text": SENTENCE, "voice": "voice1"})
        spoken = await response.content()
        self.assertEqual(response.code, 200, spoken[:200])
        recorded = tap.bytes()
        self.assertIn(b"remember", recorded)
        self.assertTrue(any(s in recorded for s in slices(pcm(spoken))))
