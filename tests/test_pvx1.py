"""
PVX/1 peers (the original Privox nodes and clients) on the farm, beside PVX/2
peers. The scripted PVX/1 peers here follow the protocol as issue 8 describes
it, not the farm's code:

  - the farm sends C{who}; the peer answers C{c} (producer node) or C{s}
    (consumer) and a 16-character key;
  - STT consumer: C{model=NAME&len=N&lang=LANG}, then C{ack} or C{nak}, then N
    bytes of audio, then the transcript, then the farm closes;
  - TTS consumer: C{model=NAME&text=TEXT&lang=LANG&idx=SPEAKER}, then an
    8-digit zero-padded length and the WAV (or C{nak}), then the farm closes;
  - producer: C{ping}/C{pong} while idle; STT job C{model=NAME&len=%08d&lang=LANG},
    C{ack}, the audio, the transcript; TTS job
    C{model=NAME&text=TEXT&lang=LANG&idx=IDX}, C{ack}, length and WAV.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.consumer import connectConsumer
from privox.farm.pvx1 import Aliases, BadHeader, parseHeader
from privox.farm.pvx1convert import speakable
from privox.keys import AllowListPolicy
from privox.engines.digest import digestOf, toneFor
from privox.node.echo import DigestHandler
from privox.wav import pcmToWav, readWavHeader
from tests.audiofixtures import tone, wavFile
from tests.farmharness import FarmHarness, ManualPolicy, Peer
from tests.loopbackfarm import LoopbackFarm
from tests.support import until

PKEY = b"producer-key-016"
CKEY = b"consumer-key-016"
assert len(PKEY) == len(CKEY) == 16
WAV = pcmToWav(bytes(range(40)), 22050)
WAV_LEN = b"%08d" % len(WAV)


def got(peer: Peer) -> bytes:
    """
    The raw bytes the farm sent C{peer} since the last call.
    """
    out = peer.transport.value()
    peer.transport.clear()
    return out


class Pvx1Harness(FarmHarness):
    def __init__(self, **settings: Any) -> None:
        settings.setdefault("pvx1_quiet", 0.05)
        super().__init__(**settings)

    def quiet(self) -> None:
        "Let the PVX/1 quiet period pass."
        self.clock.advance(self.farm.settings.pvx1_quiet)

    def node(self, service: str = "stt", key: bytes = PKEY) -> Peer:
        peer = self.peer(service)
        peer.raw(b"c" + key)
        self.quiet()  # a node's key ends when it goes quiet
        return peer

    def client(self, service: str, header: bytes, key: bytes = CKEY, quiet: bool = True) -> Peer:
        peer = self.peer(service)
        peer.raw(b"s" + key)
        peer.raw(header)
        if quiet:
            self.quiet()
        return peer


class HeaderParsingTests(SynchronousTestCase):
    def test_stt(self) -> None:
        self.assertEqual(
            parseHeader("stt", b"model=tiny.en&len=00000010&lang=en"),
            {"model": "tiny.en", "len": "00000010", "lang": "en"},
        )

    def test_ttsTextWithAmpersands(self) -> None:
        self.assertEqual(
            parseHeader("tts", b"model=m&text=Tom & Jerry&co=1&lang=de&idx=p225"),
            {"model": "m", "text": "Tom & Jerry&co=1", "lang": "de", "idx": "p225"},
        )
        self.assertEqual(parseHeader("tts", b"model=m&text=a&b"), {"model": "m", "text": "a&b"})

    def test_bad(self) -> None:
        for service, raw in [("stt", b"model=x&size=3"), ("stt", b"len=3&model=x&lang=en&len=4"),
                             ("tts", b"text=hi&model=m"), ("stt", b"\xff\xfe")]:
            self.assertRaises(BadHeader, parseHeader, service, raw)

    def test_aliases(self) -> None:
        a = Aliases(["tiny=whisper:tiny", "old=new"])
        self.assertEqual((a.pvx2Name("tiny"), a.pvx2Name("vosk:ko")), ("whisper:tiny", "vosk:ko"))
        self.assertEqual(a.pvx1Name("new"), "old")
        self.assertEqual(a.capability().models, frozenset({"whisper:tiny", "new"}))
        self.assertRaises(ValueError, Aliases, ["no-equals"])


class SettingsTests(SynchronousTestCase):
    def test_aliasOptions(self) -> None:
        from twisted.python import usage

        from privox.farm.service import Options

        options = Options()
        options.parseOptions(["--pvx1-stt-models", "old=whisper:old", "--pvx1-quiet", "0.2"])
        self.assertEqual(options.settings.pvx1_stt_models, ("old=whisper:old",))
        self.assertEqual(options.settings.pvx1_quiet, 0.2)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--pvx1-tts-models", "nothing"])
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--pvx1-quiet", "0"])


class Pvx1ExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Pvx1Harness(ping_interval=10, queue_timeout=5, cancel_grace=10,
                             max_job_bytes=100_000)

    def idle(self, node: Peer) -> bool:
        return self.h.farm.dispatchers[node.protocol.service].isIdle(node.protocol.session)

    def test_sttPvx1ToPvx1(self) -> None:
        node = self.h.node()
        self.assertEqual(got(node), b"")
        # The original clients name languages (English); nodes get codes.
        consumer = self.h.client("stt", b"model=tiny.en&len=10&lang=English")
        self.assertEqual(got(consumer), b"ack")
        consumer.raw(b"01234")  # collected: the header carries the length
        self.assertEqual(got(node), b"")  # the node reads, of the upload
        consumer.raw(b"56789")
        self.assertEqual(got(node), b"model=tiny.en&len=00000010&lang=en")
        node.raw(b"ack")
        self.assertEqual(got(node), b"0123456789")
        node.raw(b"hello ")
        self.h.clock.advance(0.04)
        node.raw(b"world")
        self.h.clock.advance(0.04)
        self.assertEqual(got(consumer), b"")
        self.h.clock.advance(0.01)
        self.assertEqual(got(consumer), b"hello world")
        self.assertTrue(consumer.closed)
        self.assertTrue(self.idle(node))
        self.assertEqual(self.h.farm.counters.succeeded, 1)

    def test_ttsPvx1ToPvx1(self) -> None:
        node = self.h.node("tts")
        consumer = self.h.client(
            "tts", b"model=tts_models/en/vctk/vits&text=Salt & pepper.&lang=en&idx=p225")
        # Spelled out: an original node cuts its header at & (and dies).
        self.assertEqual(got(node), b"model=tts_models/en/vctk/vits&text=Salt and pepper.&lang=en&idx=p225")
        self.assertEqual(got(consumer), b"")  # TTS has no ack
        node.raw(b"ack")
        node.raw(WAV_LEN[:6])
        node.raw(WAV_LEN[6:] + WAV[:10])
        node.raw(WAV[10:])
        self.assertEqual(got(consumer), WAV_LEN + WAV)
        self.assertTrue(consumer.closed)
        self.assertTrue(self.idle(node))

    def test_ttsDefaults(self) -> None:
        node = self.h.node("tts")
        self.h.client("tts", b"model=tts_models/en/vctk/vits&text=Hi.")
        self.assertEqual(got(node), b"model=tts_models/en/vctk/vits&text=Hi.&lang=en&idx=p236")

    def test_pingPong(self) -> None:
        node = self.h.node()
        self.h.clock.advance(10)
        self.assertEqual(got(node), b"ping")
        node.raw(b"po")
        node.raw(b"ng")
        self.h.clock.advance(9.9)
        self.assertEqual(got(node), b"")
        self.h.clock.advance(0.1)
        self.assertEqual(got(node), b"ping")
        # The slack the original farm gave: a node that stalls (loading a
        # model) is kept for pvx1_pong_timeout.
        self.h.clock.advance(29.9)
        self.assertFalse(node.closed)
        self.h.clock.advance(0.1)
        self.assertTrue(node.closed)
        node.lose()
        self.assertFalse(self.h.farm.dispatchers["stt"].canServe("whisper:tiny.en", None))

    def test_headerWaitsForPong(self) -> None:
        """
        A job assigned while a ping is unanswered: its header waits for the
        pong (an original node reading "ping" and a header in one read
        answers pong and loses the job).
        """
        node = self.h.node()
        self.h.clock.advance(10)
        self.assertEqual(got(node), b"ping")
        consumer = self.h.client("stt", b"model=tiny&len=1&lang=en")
        consumer.raw(b"x")
        self.h.clock.advance(8)  # a node frozen across its ping
        self.assertEqual(got(node), b"")
        node.raw(b"pong")
        self.assertEqual(got(node), b"model=tiny&len=00000001&lang=en")
        node.raw(b"ack")
        self.assertEqual(got(node), b"x")
        node.raw(b"fine")
        self.h.quiet()
        self.assertEqual(got(consumer), b"ack" + b"fine")
        # One that never answers is dropped, at pvx1_pong_timeout.
        self.h.clock.advance(10)
        self.assertEqual(got(node), b"ping")
        consumer = self.h.client("stt", b"model=tiny&len=1&lang=en")
        consumer.raw(b"x")
        self.h.clock.advance(29.9)
        self.assertFalse(node.closed)
        self.h.clock.advance(0.1)
        self.assertTrue(node.closed)

    def test_headerSplitAcrossSegments(self) -> None:
        node = self.h.node()
        consumer = self.h.client("stt", b"model=tiny.e", quiet=False)
        self.h.quiet()  # incomplete: quiet alone does not end a header
        consumer.raw(b"n&len=1")
        self.h.clock.advance(0.04)
        consumer.raw(b"2&lang=e")
        self.h.clock.advance(0.04)
        consumer.raw(b"n")
        self.h.clock.advance(0.04)
        self.assertEqual(got(consumer), b"")
        self.h.clock.advance(0.01)
        self.assertEqual(got(consumer), b"ack")
        consumer.raw(b"x" * 12)
        self.assertEqual(got(node), b"model=tiny.en&len=00000012&lang=en")

    def test_headerByteByByte(self) -> None:
        node = self.h.node("tts")
        header = b"model=tts_models/en/vctk/vits&text=One & two&lang=en&idx=p240"
        consumer = self.h.peer("tts")
        for b in b"s" + CKEY + header:
            consumer.raw(bytes([b]))
            self.h.clock.advance(0.01)
        self.assertEqual(got(node), b"")
        self.h.quiet()
        self.assertEqual(got(node), header.replace(b" & ", b" and "))

    def test_keyAndHeaderInOneSegment(self) -> None:
        node = self.h.node()
        consumer = self.h.peer()
        consumer.raw(b"s" + CKEY + b"model=tiny&len=3&lang=en")
        self.h.quiet()
        self.assertEqual(got(consumer), b"ack")
        consumer.raw(b"abc")
        self.assertEqual(got(node), b"model=tiny&len=00000003&lang=en")

    def test_keysOfAnyLength(self) -> None:
        """
        Original keys are not all 16 characters: a consumer's ends where
        its header starts, a node's when it goes quiet.
        """
        h = Pvx1Harness(
            producerKeys=AllowListPolicy("p.txt", frozenset({"short", "a-longer-node-key-of-33-characters"})),
            consumerKeys=AllowListPolicy("c.txt", frozenset({"c1", "cc" * 20})),
        )
        for key in (b"short", b"a-longer-node-key-of-33-characters"):
            node = h.peer("tts")
            node.raw(b"c" + key[:3])
            h.clock.advance(0.04)
            node.raw(key[3:])
            self.assertFalse(node.closed)
            h.quiet()
            self.assertFalse(node.closed)
        self.assertEqual(h.farm.dispatchers["tts"].producersByModel(),
                         {"coqui:tts_models/en/vctk/vits": (2, 2)})
        for key in (b"c1", b"cc" * 20):
            consumer = h.peer("tts")
            consumer.raw(b"s" + key + b"model=tts_models/en/vctk/vits&text=Hi.")
            h.quiet()
            self.assertFalse(consumer.closed)
        refused = h.client("tts", b"model=tts_models/en/vctk/vits&text=Hi.", key=b"c1c")
        self.assertEqual(got(refused), b"nak")
        impostor = h.peer("tts")
        impostor.raw(b"cshort!")
        h.quiet()
        self.assertTrue(impostor.closed)

    def test_headerCap(self) -> None:
        node = self.h.node("tts")
        prefix = b"model=tts_models/en/vctk/vits&text="
        header = prefix + b"x" * (255 - len(prefix))
        self.h.client("tts", header, quiet=False)
        # 255 bytes: complete at once, no quiet period needed.
        self.assertEqual(got(node), header + b"&lang=en&idx=p236")
        consumer = self.h.client("tts", header + b"y", quiet=False)
        self.assertEqual(got(consumer), b"nak")
        self.assertTrue(consumer.closed)

    def test_longHeaderWithKey(self) -> None:
        """
        Key and an over-long header in one segment: nak, as for any header
        beyond 255 bytes.
        """
        self.h.node("tts")
        consumer = self.h.peer("tts")
        consumer.raw(b"s" + CKEY + b"model=tts_models/en/vctk/vits&text=" + b"x" * 300)
        self.assertEqual(got(consumer), b"nak")
        self.assertTrue(consumer.closed)

    def test_nakWhenNoNode(self) -> None:
        for service, header in [("stt", b"model=tiny&len=5&lang=en"),
                                ("tts", b"model=tts_models/en/vctk/vits&text=Hi")]:
            consumer = self.h.client(service, header)
            self.assertEqual(got(consumer), b"nak")
            self.assertTrue(consumer.closed)

    def test_nakWhenNoNodeBecomesFree(self) -> None:
        node = self.h.node()
        self.h.client("stt", b"model=tiny&len=5&lang=en")
        got(node)
        waiting = self.h.client("stt", b"model=tiny&len=5&lang=en")
        self.h.clock.advance(4.9)
        self.assertEqual(got(waiting), b"")
        self.h.clock.advance(0.1)
        self.assertEqual(got(waiting), b"nak")
        self.assertTrue(waiting.closed)

    def test_nakUnsupportedModel(self) -> None:
        self.h.node()
        consumer = self.h.client("stt", b"model=vosk:ko&len=5&lang=ko")
        self.assertEqual(got(consumer), b"nak")
        self.assertTrue(consumer.closed)

    def test_nakBadHeader(self) -> None:
        self.h.node()
        self.h.node("tts")
        for service, header in [("stt", b"model=tiny&len=abc&lang=en"),
                                ("stt", b"model=tiny&len=0&lang=en"),
                                ("stt", b"model=tiny&len=100001&lang=en"),  # too large
                                ("tts", b"model=tts_models/en/vctk/vits&text=   ")]:
            consumer = self.h.client(service, header)
            self.assertEqual(got(consumer), b"nak", header)
            self.assertTrue(consumer.closed)

    def test_incompleteHeaderTimesOut(self) -> None:
        h = Pvx1Harness(handshake_timeout=10)
        for header in (b"model=tiny", b"GET / HTTP/1.1\r\n\r\n"):
            consumer = h.client("stt", header, quiet=False)
            h.clock.advance(9.9)
            self.assertFalse(consumer.closed)
            h.clock.advance(0.1)
            self.assertEqual(got(consumer), b"nak")
            self.assertTrue(consumer.closed)

    def test_pvx1NodeLostMidJobPvx2Consumer(self) -> None:
        node = self.h.node()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "whisper:tiny.en", "language": "en", "size": 4, "format": "pcm_s16le"})
        [(_, asgn)] = consumer.messages()
        consumer.data(b"abcd")
        node.raw(b"ack")
        node.lose()
        self.assertEqual(consumer.messages(),
                         [("FAIL", {"id": asgn["id"], "error": "producer_lost",
                                    "message": "the producer went away mid-job"})])
        self.assertFalse(consumer.closed)

    def test_pvx1NodeLostMidJobPvx1Consumer(self) -> None:
        node = self.h.node()
        consumer = self.h.client("stt", b"model=tiny&len=4&lang=en")
        self.assertEqual(got(consumer), b"ack")
        consumer.raw(b"abcd")
        node.raw(b"ack")
        node.lose()
        self.assertEqual(got(consumer), b"")  # no transcript, no error message
        self.assertTrue(consumer.closed)

    def test_pvx1NodeGarbage(self) -> None:
        node = self.h.node()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "whisper:tiny", "size": 4})
        [(_, asgn)] = consumer.messages()
        node.raw(b"what?")
        self.assertTrue(node.closed)
        node.lose()
        self.assertEqual(consumer.messages()[0][1]["error"], "producer_lost")
        # Garbage from an idle node too.
        node = self.h.node()
        node.raw(b"hello")
        self.assertTrue(node.closed)

    def test_pvx1NodeBadLength(self) -> None:
        node = self.h.node("tts")
        consumer = self.h.client("tts", b"model=tts_models/en/vctk/vits&text=Hi")
        node.raw(b"ack0000x")
        self.assertTrue(node.closed)
        node.lose()
        self.assertEqual(got(consumer), b"nak")
        self.assertTrue(consumer.closed)

    def test_pvx1ConsumerToPvx2Node(self) -> None:
        producer = self.h.producer(models=["whisper:tiny.en"], languages=["en"])
        consumer = self.h.client("stt", b"model=tiny.en&len=6&lang=en")
        [(verb, work)] = producer.messages()
        self.assertEqual((verb, work["model"], work["language"], work["size"]),
                         ("JOB_", "whisper:tiny.en", "en", 6))
        self.assertEqual(got(consumer), b"ack")
        consumer.raw(b"abc")
        consumer.raw(b"def")
        self.assertEqual(producer.messages(), [("DATA", b"abc"), ("DATA", b"def")])
        producer.send(b"RSLT", {"id": work["id"], "text": "héllo"})
        self.assertEqual(got(consumer), "héllo".encode())
        self.assertTrue(consumer.closed)

    def test_pvx1TtsConsumerToPvx2Node(self) -> None:
        producer = self.h.producer("tts", models=["coqui:tts_models/en/vctk/vits"])
        consumer = self.h.client("tts", b"model=tts_models/en/vctk/vits&text=Hi&idx=p300")
        [(_, work)] = producer.messages()
        self.assertEqual((work["model"], work["text"], work["voice"], work["language"]),
                         ("coqui:tts_models/en/vctk/vits", "Hi", "p300", "en"))
        producer.send(b"RSLT", {"id": work["id"], "content_type": "audio/wav", "size": len(WAV)})
        producer.data(WAV[:20])
        producer.data(WAV[20:])
        self.assertEqual(got(consumer), WAV_LEN + WAV)
        self.assertTrue(consumer.closed)

    def test_pvx2NodeFailsPvx1Consumer(self) -> None:
        producer = self.h.producer(models=["*"])
        consumer = self.h.client("stt", b"model=tiny&len=2&lang=en")
        [(_, work)] = producer.messages()
        got(consumer)
        producer.send(b"FAIL", {"id": work["id"], "error": "engine_error", "message": "x"})
        self.assertEqual(got(consumer), b"")
        self.assertTrue(consumer.closed)

    def test_pvx2ConsumerToPvx1Node(self) -> None:
        node = self.h.node()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "whisper:base.en", "size": 4, "format": "pcm_s16le"})
        [(verb, asgn)] = consumer.messages()
        self.assertEqual(verb, "ASGN")
        consumer.data(b"ab")
        self.assertEqual(got(node), b"")
        consumer.data(b"cd")
        self.assertEqual(got(node), b"model=base.en&len=00000004&lang=en")
        node.raw(b"ack")
        self.assertEqual(got(node), b"abcd")
        node.raw(b"four bytes")
        self.h.quiet()
        self.assertEqual(consumer.messages(), [("RSLT", {"text": "four bytes", "id": asgn["id"]})])
        self.assertTrue(self.idle(node))

    def test_pvx2EarlyUploadToPvx1Node(self) -> None:
        """
        An early upload (docs/protocol.rst §5.3), in one piece with its JOB_,
        still waits for the PVX/1 node's C{ack}: the node gets the header
        first and the audio only after it.
        """
        from privox.framing import encodeFrame
        from privox.messages import controlFrame

        node = self.h.node()
        consumer = self.h.consumer()
        consumer.raw(controlFrame(b"JOB_", {"model": "whisper:base.en", "size": 4, "early": True, "format": "pcm_s16le"})
                     + encodeFrame(b"DATA", b"abcd"))
        [(verb, asgn)] = consumer.messages()
        self.assertEqual(verb, "ASGN")
        self.assertEqual(got(node), b"model=base.en&len=00000004&lang=en")
        node.raw(b"ack")
        self.assertEqual(got(node), b"abcd")
        node.raw(b"four bytes")
        self.h.quiet()
        self.assertEqual(consumer.messages(), [("RSLT", {"text": "four bytes", "id": asgn["id"]})])

    def test_pvx2TtsConsumerToPvx1Node(self) -> None:
        node = self.h.node("tts")
        consumer = self.h.consumer("tts")
        consumer.send(b"JOB_", {"model": "coqui:tts_models/en/vctk/vits", "text": "a&b",
                                "voice": "p250", "language": "en", "size": 0})
        [(_, asgn)] = consumer.messages()
        self.assertEqual(got(node), b"model=tts_models/en/vctk/vits&text=a and b&lang=en&idx=p250")
        node.raw(b"ack" + WAV_LEN + WAV)
        messages = consumer.messages()
        self.assertEqual(messages[0], ("RSLT", {"content_type": "audio/wav", "size": len(WAV), "id": asgn["id"]}))
        self.assertEqual(b"".join(body for _, body in messages[1:]), WAV)
        self.assertTrue(self.idle(node))

    def test_cancelIsNotSentToPvx1Node(self) -> None:
        node = self.h.node()
        # A consumer gone mid-upload: the node never heard of the job.
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "whisper:tiny", "size": 1_000_000, "format": "pcm_s16le"})
        consumer.data(b"a" * 1024)
        consumer.lose()
        self.assertEqual(got(node), b"")
        self.assertTrue(self.idle(node))
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "whisper:tiny", "size": 2, "format": "pcm_s16le"})
        consumer.data(b"ab")
        got(node)
        node.raw(b"ack")
        consumer.lose()
        self.assertEqual(got(node), b"ab")  # no CNCL: PVX/1 has none
        node.raw(b"too late")
        self.h.quiet()
        self.assertTrue(self.idle(node))
        # One that never answers is dropped after cancel_grace.
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "whisper:tiny", "size": 2, "format": "pcm_s16le"})
        consumer.data(b"ab")
        node.raw(b"ack")
        consumer.lose()
        self.h.clock.advance(9.9)
        self.assertFalse(node.closed)
        self.h.clock.advance(0.1)
        self.assertTrue(node.closed)

    def test_nodeNak(self) -> None:
        node = self.h.node()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "whisper:tiny", "size": 2, "format": "pcm_s16le"})
        [(_, asgn)] = consumer.messages()
        consumer.data(b"ab")
        node.raw(b"nak")
        self.assertEqual(consumer.messages()[0][1]["error"], "engine_error")
        self.assertTrue(self.idle(node))

    def test_customAliases(self) -> None:
        h = Pvx1Harness(pvx1_stt_models=("ancient=vosk:en-us",))
        node = h.node()
        self.assertEqual(h.farm.dispatchers["stt"].producersByModel(), {"vosk:en-us": (1, 1)})
        consumer = h.client("stt", b"model=ancient&len=1&lang=en")
        self.assertEqual(got(consumer), b"ack")
        consumer.raw(b"x")
        self.assertEqual(got(node), b"model=ancient&len=00000001&lang=en")

    def test_keyPolicy(self) -> None:
        h = Pvx1Harness(
            producerKeys=AllowListPolicy("p.txt", frozenset({PKEY.decode()})),
            consumerKeys=AllowListPolicy("c.txt", frozenset({CKEY.decode()})),
        )
        self.assertTrue(h.node(key=CKEY).closed)  # a consumer key, not a producer one
        node = h.node(key=PKEY)
        self.assertFalse(node.closed)
        refused = h.client("stt", b"model=tiny&len=1&lang=en", key=PKEY)
        self.assertEqual(got(refused), b"nak")
        self.assertTrue(refused.closed)
        accepted = h.client("stt", b"model=tiny&len=1&lang=en", key=CKEY)
        self.assertEqual(got(accepted), b"ack")

    def test_asynchronousKeyCheck(self) -> None:
        policy = ManualPolicy()
        h = Pvx1Harness(consumerKeys=policy)
        node = h.node()
        consumer = h.client("stt", b"model=tiny&len=1&lang=en")
        [(key, d)] = policy.pending
        self.assertEqual(key, CKEY.decode())
        self.assertEqual(got(node), b"")
        d.callback(True)
        h.quiet()
        self.assertEqual(got(consumer), b"ack")
        consumer.raw(b"x")
        self.assertEqual(got(node), b"model=tiny&len=00000001&lang=en")

    def test_shutdown(self) -> None:
        node = self.h.node()
        queued = self.h.client("stt", b"model=tiny&len=1&lang=en")
        waiting = self.h.client("stt", b"model=tiny&len=1&lang=en")
        stopped = self.h.farm.shutdown()
        self.assertEqual(got(waiting), b"nak")
        got(queued)
        queued.raw(b"x")
        node.raw(b"ack")
        node.raw(b"done")
        self.h.quiet()
        self.successResultOf(stopped)
        self.assertEqual(got(queued), b"done")
        self.assertTrue(node.closed and queued.closed)


class TranslationTests(SynchronousTestCase):
    """
    What original nodes are given, so that they can read it (issue 18):
    audio they read as 16 kHz mono PCM, texts in pieces that fit their one
    1024-byte read, an end to a transcript that has no bytes.
    """

    def setUp(self) -> None:
        self.h = Pvx1Harness(ping_interval=10, queue_timeout=5, cancel_grace=10)

    def idle(self, node: Peer) -> bool:
        return self.h.farm.dispatchers[node.protocol.service].isIdle(node.protocol.session)

    def test_emptyTranscript(self) -> None:
        """
        An original node answers silence with no bytes at all: a ping after
        the upload, answered behind the transcript, ends it.
        """
        node = self.h.node()
        for answer, text in [(b"pong", b""), (b"hello pong", b"hello "), (b"hellopong", b"hello")]:
            consumer = self.h.client("stt", b"model=tiny&len=2&lang=en")
            consumer.raw(b"ab")
            got(node)
            node.raw(b"ack")
            self.assertEqual(got(node), b"ab")
            self.h.clock.advance(0.4)
            self.assertEqual(got(node), b"")
            self.h.clock.advance(0.2)  # PROBE_DELAY, 0.5 s
            self.assertEqual(got(node), b"ping")
            node.raw(answer)
            self.h.quiet()
            self.assertEqual(got(consumer), b"ack" + text)
            self.assertTrue(consumer.closed)
            self.assertTrue(self.idle(node))
        # A transcript that came before the ping was due needs none.
        consumer = self.h.client("stt", b"model=tiny&len=2&lang=en")
        consumer.raw(b"ab")
        node.raw(b"ack")
        got(node)
        node.raw(b"quick")
        self.h.quiet()
        self.h.clock.advance(1)
        self.assertEqual(got(node), b"")
        self.assertEqual(got(consumer), b"ack" + b"quick")

    def test_audioConverted(self) -> None:
        """
        A 44.1 kHz stereo WAV reaches an original node as a 16 kHz mono
        16-bit WAV, which it reads as raw PCM; its length is the header's.
        """
        node = self.h.node()
        wav = wavFile(np.stack([tone(1.0, 44100), tone(1.0, 44100)], axis=1), 44100)
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "whisper:tiny", "size": len(wav), "format": "wav"})
        consumer.data(wav)
        header = got(node)
        converted = 44 + 16000 * 2
        self.assertEqual(header, b"model=tiny&len=%08d&lang=en" % converted)
        node.raw(b"ack")
        sent = got(node)
        self.assertEqual(len(sent), converted)
        fmt = readWavHeader(sent).format
        self.assertEqual((fmt.rate, fmt.channels, fmt.width), (16000, 1, 2))
        # A WAV it reads already goes as it is.
        readable = pcmToWav(b"\x01\x00" * 800, 16000)
        consumer.messages()
        node.raw(b"text")
        self.h.quiet()
        consumer.messages()
        consumer.send(b"JOB_", {"model": "whisper:tiny", "size": len(readable)})
        consumer.data(readable)
        got(node)
        node.raw(b"ack")
        self.assertEqual(got(node), readable)

    def test_notAudio(self) -> None:
        node = self.h.node()
        consumer = self.h.consumer()
        consumer.send(b"JOB_", {"model": "whisper:tiny", "size": 4, "format": "wav"})
        consumer.data(b"RIFX")
        [(_, asgn), (verb, fail)] = consumer.messages()
        self.assertEqual((verb, fail["error"]), ("FAIL", "bad_request"))
        self.assertEqual(got(node), b"")
        self.assertTrue(self.idle(node))

    def test_longTextInPieces(self) -> None:
        """
        A text longer than an original node's one read goes in pieces of
        whole characters, each spoken in turn; the consumer gets one WAV.
        """
        node = self.h.node("tts")
        sentence = "Größe & Maß = ünf. "  # two-byte characters, & and =
        text = (sentence * 200).strip()
        consumer = self.h.consumer("tts")
        consumer.send(b"JOB_", {"model": "coqui:tts_models/en/vctk/vits", "text": text,
                                "language": "de", "size": 0})
        consumer.messages()
        pieces = []
        while True:
            header = got(node)
            if not header:
                break
            self.assertLessEqual(len(header), 1000)
            fields = header.decode("utf-8").split("&")
            self.assertEqual([f.split("=")[0] for f in fields], ["model", "text", "lang", "idx"])
            pieces.append(fields[1][len("text="):])
            node.raw(b"ack" + WAV_LEN + WAV)
        self.assertGreater(len(pieces), 3)
        self.assertEqual(" ".join(pieces), speakable(text, "de"))
        self.assertIn(" und ", pieces[0])
        messages = consumer.messages()
        joined = b"".join(body for verb, body in messages[1:])
        self.assertEqual(messages[0][1]["size"], len(joined))
        header = readWavHeader(joined)
        self.assertEqual(header.dataSize, 40 * len(pieces))
        self.assertEqual(joined[header.dataStart:], bytes(range(40)) * len(pieces))
        self.assertTrue(self.idle(node))

    def test_originalVoicesOnOtherModels(self) -> None:
        """
        The original's consumers always ask for Coqui VCTK and its speakers;
        with no producer for that, the job goes to a TTS model that is
        served, in its own voice.
        """
        piper = self.h.producer("tts", models=["piper:en_US-joe-medium"], languages=["en"])
        for idx in (b"p236", b"p270"):
            consumer = self.h.client(
                "tts", b"model=tts_models/en/vctk/vits&text=Hi.&lang=English&idx=" + idx)
            [(verb, work)] = piper.messages()
            self.assertEqual((verb, work["model"], work.get("voice"), work["language"]),
                             ("JOB_", "piper:en_US-joe-medium", None, "en"))
            piper.send(b"RSLT", {"id": work["id"], "content_type": "audio/wav", "size": len(WAV)})
            piper.data(WAV)
            self.assertEqual(got(consumer), WAV_LEN + WAV)
        # Where the named model is served, it is used, speaker and all.
        vctk = self.h.producer("tts", models=["coqui:tts_models/en/vctk/vits"])
        self.h.client("tts", b"model=tts_models/en/vctk/vits&text=Hi.&idx=p270")
        [(_, work)] = vctk.messages()
        self.assertEqual((work["model"], work["voice"]), ("coqui:tts_models/en/vctk/vits", "p270"))
        # No fallback configured: nak, as before.
        h = Pvx1Harness(pvx1_tts_fallback=())
        h.producer("tts", models=["piper:en_US-joe-medium"], languages=["en"])
        consumer = h.client("tts", b"model=tts_models/en/vctk/vits&text=Hi.")
        self.assertEqual(got(consumer), b"nak")


# --------------------------------------------------------------------------
# Scripted PVX/1 peers on real sockets.


class Pvx1Node(Protocol):
    """
    A PVX/1 producer node that answers STT jobs with the digest of the audio
    (as DigestHandler does) and TTS jobs with toneFor(text).
    """

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.buffer = b""
        self.job: dict[str, str] | None = None
        self.audio = b""
        self.jobs = 0

    def dataReceived(self, data: bytes) -> None:
        if not self.ready.called:
            assert data == b"who", data
            self.transport.write(b"c" + PKEY)
            self.ready.callback(None)
            return
        if self.job is None:
            while data.startswith(b"ping"):
                self.transport.write(b"pong")
                data = data[4:]
            if not data:
                return
            # One header per write, as the original nodes read them.
            text = data.decode()
            if text.startswith("model=") and "&len=" in text:
                model, size, lang = (p.split("=", 1)[1] for p in text.split("&"))
                self.job = {"model": model, "len": size}
                self.audio = b""
                self.transport.write(b"ack")
            else:
                body = text[len("model="):]
                body, _, idx = body.rpartition("&idx=")
                body, _, lang = body.rpartition("&lang=")
                model, _, spoken = body.partition("&text=")
                wav = toneFor(spoken)
                self.transport.write(b"ack")
                self.transport.write(b"%08d" % len(wav) + wav)
                self.jobs += 1
            return
        self.audio += data
        if len(self.audio) == int(self.job["len"]):
            self.job = None
            self.jobs += 1
            self.transport.write(f"sha256:{digestOf(self.audio)} bytes:{len(self.audio)}".encode())


class Pvx1Client(Protocol):
    """
    One PVX/1 consumer connection: one job, then the farm closes.
    """

    def __init__(self, header: bytes, body: bytes = b"") -> None:
        self.header = header
        self.body = body
        self.received = b""
        self.greeted = False
        self.acked = False
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.greeted:
            assert data.startswith(b"who")
            self.greeted = True
            self.transport.write(b"s" + CKEY)
            self.transport.write(self.header)
            data = data[3:]
        if self.body and not self.acked:
            self.received += data
            if self.received[:3] == b"ack":
                self.acked = True
                self.received = self.received[3:]
                self.transport.write(self.body)
            return
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)


async def pvx1Job(port: int, header: bytes, body: bytes = b"") -> bytes:
    client = Pvx1Client(header, body)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return await client.done


async def pvx1Node(port: int) -> Pvx1Node:
    node = Pvx1Node()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), node)
    await node.ready
    return node


class Pvx1SocketTests(TestCase):
    timeout = 60

    async def _farm(self) -> LoopbackFarm:
        farm = LoopbackFarm(queue_timeout=20)
        await farm.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
        return farm

    def port(self, farm: LoopbackFarm, service: str) -> int:
        return farm.ports[service].getHost().port

    async def _waitForProducers(self, farm: LoopbackFarm, service: str, count: int) -> None:
        await until(
            lambda: sum(c for c, _ in farm.farm.dispatchers[service].producersByModel().values())
            >= count,
            f"{count} {service} producer(s)",
            5,
        )

    async def test_exchangesOverSockets(self) -> None:
        farm = await self._farm()
        stt, tts = self.port(farm, "stt"), self.port(farm, "tts")
        await pvx1Node(stt)
        await pvx1Node(tts)
        await self._waitForProducers(farm, "stt", 1)
        await self._waitForProducers(farm, "tts", 1)
        audio = random.Random(8).randbytes(200_000)
        answer = await pvx1Job(stt, b"model=tiny.en&len=%d&lang=en" % len(audio), audio)
        self.assertEqual(answer, f"sha256:{digestOf(audio)} bytes:{len(audio)}".encode())
        answer = await pvx1Job(tts, b"model=tts_models/en/vctk/vits&text=Fish & chips&lang=en&idx=p225")
        wav = toneFor("Fish and chips")
        self.assertEqual(answer, b"%08d" % len(wav) + wav)
        self.assertEqual(await pvx1Job(stt, b"model=vosk:ko&len=3&lang=ko"), b"nak")

    async def test_nakWithoutNodeOverSockets(self) -> None:
        farm = await self._farm()
        self.assertEqual(await pvx1Job(self.port(farm, "stt"), b"model=tiny&len=3&lang=en", b"abc"), b"nak")
        self.assertEqual(await pvx1Job(self.port(farm, "tts"), b"model=tts_models/en/vctk/vits&text=x"), b"nak")

    async def test_nodeLostOverSockets(self) -> None:
        farm = await self._farm()
        stt = self.port(farm, "stt")
        node = await pvx1Node(stt)
        await self._waitForProducers(farm, "stt", 1)
        # The node vanishes once it has acked: the consumer's connection closes.
        node.dataReceived = lambda data: node.transport.abortConnection()
        answer = await pvx1Job(stt, b"model=tiny&len=3&lang=en", b"abc")
        self.assertEqual(answer, b"")  # acked, then closed without a transcript

    async def test_mixedTrafficUnderLoad(self) -> None:
        farm = await self._farm()
        stt, tts = self.port(farm, "stt"), self.port(farm, "tts")
        nodes = [await pvx1Node(stt) for _ in range(4)]
        for _ in range(4):
            await farm.producer("stt", DigestHandler(("whisper:tiny.en",), ("en",)))
        await pvx1Node(tts)
        await farm.producer("tts", DigestHandler(("coqui:tts_models/en/vctk/vits",), ()))
        await self._waitForProducers(farm, "stt", 8)
        rng = random.Random(1776)

        async def pvx1Consumer(n: int) -> int:
            for i in range(5):
                audio = hashlib.sha256(b"%d/%d" % (n, i)).digest() + rng.randbytes(rng.randrange(1, 50_000))
                answer = await pvx1Job(stt, b"model=tiny.en&len=%d&lang=en" % len(audio), audio)
                self.assertEqual(answer, f"sha256:{digestOf(audio)} bytes:{len(audio)}".encode())
            text = f"pvx1 consumer {n} & friends"
            answer = await pvx1Job(tts, f"model=tts_models/en/vctk/vits&text={text}".encode())
            # Spelled out for the PVX/1 node, as it is for a PVX/2 one.
            self.assertIn(answer, [b"%08d" % len(w) + w for w in (toneFor(text), toneFor(speakable(text, "en")))])
            return 6

        async def pvx2Consumer(n: int) -> int:
            consumer = await connectConsumer(reactor, farm.endpoint("stt"), "stt", f"c{n}")
            for i in range(5):
                audio = hashlib.sha256(b"v2 %d/%d" % (n, i)).digest() + rng.randbytes(rng.randrange(1, 50_000))
                result = await consumer.stt("whisper:tiny.en", audio, language="en", format="pcm_s16le")
                self.assertEqual(result.text, f"sha256:{digestOf(audio)} bytes:{len(audio)}")
            consumer.transport.loseConnection()
            consumer = await connectConsumer(reactor, farm.endpoint("tts"), "tts", f"t{n}")
            text = f"pvx2 consumer {n}"
            result = await consumer.tts("coqui:tts_models/en/vctk/vits", text)
            self.assertEqual(result.data, toneFor(text))
            consumer.transport.loseConnection()
            return 6

        runs = [Deferred.fromCoroutine(pvx1Consumer(n)) for n in range(8)]
        runs += [Deferred.fromCoroutine(pvx2Consumer(n)) for n in range(8)]
        results = await DeferredList(runs, fireOnOneErrback=True, consumeErrors=True)
        self.assertEqual(sum(count for _, count in results), 16 * 6)
        self.assertEqual(farm.farm.counters.succeeded, 16 * 6)
        # Both kinds of node did work.
        self.assertGreater(sum(node.jobs for node in nodes), 0)
