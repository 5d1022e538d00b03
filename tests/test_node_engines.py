"""
A node with real models behind a real farm, over loopback sockets: the
bundled Piper voice speaks, the bundled Whisper model hears it back, and bad
input fails precisely while the node keeps serving.
"""

from __future__ import annotations

import io
import wave

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from privox.consumer import JobFailed, connectConsumer
from privox.node.service import NodeService, NodeSettings
from privox.engines.registry import ModelSpec, createEngine
from tests.loopbackfarm import LoopbackFarm
from tests.support import until
from tests.test_node import producers
from tests.wer import wer

SENTENCE = "Privacy matters to everyone who uses the internet."


class RealEnginesTests(TestCase):
    timeout = 120

    async def test_speakThenHear(self) -> None:
        farm = LoopbackFarm()
        await farm.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
        settings = NodeSettings(
            stt_farm=(farm.endpoint("stt"),), tts_farm=(farm.endpoint("tts"),),
            stt=("whisper:tiny.en", "vosk:ko"), tts=("piper:en_US-joe-medium",), slots=1,
        )
        engines = [createEngine(ModelSpec.parse(s)) for s in settings.stt + settings.tts]
        node = NodeService(settings, engines, reactor, stopOnFailure=False)
        node.startService()
        self.addCleanup(node._threadpool.stop)
        await node.ready
        await until(lambda: producers(farm, "stt") and producers(farm, "tts"), "the node", 60)
        self.assertEqual(
            sorted(farm.farm.dispatchers["stt"].producersByModel()), ["vosk:ko", "whisper:tiny.en"]
        )

        tts = await connectConsumer(reactor, farm.endpoint("tts"), "tts")
        spoken = await tts.tts("piper:en_US-joe-medium", SENTENCE, language="en")
        with wave.open(io.BytesIO(spoken.data)) as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth()), (1, 2))
            self.assertGreater(w.getnframes() / w.getframerate(), 1.0)
        with self.assertRaises(JobFailed) as caught:
            await tts.tts("piper:en_US-joe-medium", SENTENCE, voice="nobody")
        self.assertEqual(caught.exception.code, "unsupported_model")

        stt = await connectConsumer(reactor, farm.endpoint("stt"), "stt")
        heard = await stt.stt("whisper:tiny.en", spoken.data, language="en", format="wav")
        self.assertLessEqual(wer(SENTENCE, heard.text), 0.25, heard.text)
        self.assertEqual(heard.fields["language"], "en")
        with self.assertRaises(JobFailed) as caught:
            await stt.stt("whisper:tiny.en", b"\x00garbage, not audio" * 50)
        self.assertEqual(caught.exception.code, "bad_request")
        with self.assertRaises(JobFailed) as caught:
            await stt.stt("whisper:tiny.en", spoken.data, language="de")
        self.assertEqual(caught.exception.code, "no_producer")
        # The streaming engine, on the same connection, after the failures.
        korean = await stt.stt("vosk:ko", spoken.data, language="ko")
        self.assertIsInstance(korean.text, str)

        for consumer in (tts, stt):
            consumer.transport.loseConnection()
        await node.stopService()
