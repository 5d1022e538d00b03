"""
Control messages: what is a protocol violation (connection closes) and what
is a bad request (only the job fails).
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from privox.framing import Frame, FrameDecoder
from privox.messages import (
    BadRequest,
    ErrorCode,
    Hello,
    JobRequest,
    Okay,
    ProtocolViolation,
    controlFrame,
    decodeObject,
    resultSize,
)


def obj(**fields):
    return fields


class DecodeObjectTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        [frame] = FrameDecoder().feed(controlFrame(b"ASGN", {"id": "ab", "t": "é"}))
        self.assertEqual(decodeObject(frame), {"id": "ab", "t": "é"})

    def test_emptyPingIsEmptyObject(self) -> None:
        self.assertEqual(decodeObject(Frame(b"PING", b"")), {})

    def test_emptyControlIsViolation(self) -> None:
        self.assertRaises(ProtocolViolation, decodeObject, Frame(b"JOB_", b""))

    def test_invalidJson(self) -> None:
        for bad in (b"{", b"\xff\xfe", b"[1,2]", b'"s"', b"3"):
            self.assertRaises(ProtocolViolation, decodeObject, Frame(b"JOB_", bad))

    def test_notStrictJson(self) -> None:
        """
        What Python's json would take but JSON is not: NaN and Infinity,
        numbers beyond a double, lone surrogates, UTF-16.
        """
        for bad in (
            b'{"a":NaN}', b'{"a":-Infinity}', b'{"a":1e400}', b'{"a":"\\ud800"}',
            '{"a":1}'.encode("utf-16"),
        ):
            with self.assertRaises(ProtocolViolation, msg=bad) as caught:
                decodeObject(Frame(b"JOB_", bad))
            self.assertIn("not valid JSON", str(caught.exception))

    def test_nestedTooDeeply(self) -> None:
        with self.assertRaises(ProtocolViolation) as caught:
            decodeObject(Frame(b"JOB_", b"[" * 100_000))
        self.assertIn("nested too deeply", str(caught.exception))

    def test_encodesNoNaN(self) -> None:
        """
        A number JSON has no word for goes as null, never as NaN.
        """
        [frame] = FrameDecoder().feed(controlFrame(b"RSLT", {"x": float("nan"), "t": "\u2028é"}))
        self.assertEqual(frame.payload, '{"x":null,"t":"\u2028é"}'.encode())


class HelloTests(SynchronousTestCase):
    def test_producer(self) -> None:
        hello = Hello.parse(
            obj(protocol=2, role="producer", service="stt", key="k",
                models=["whisper:tiny.en"], languages=["en"])
        )
        self.assertEqual(hello, Hello("producer", "stt", "k", ("whisper:tiny.en",), ("en",)))
        self.assertEqual(Hello.parse(hello.payload()), hello)

    def test_earlySeal(self) -> None:
        """
        A sealing producer may say it opens uploads sealed early (§5.7): a
        feature jobs can need; without a seal offer, the flag means nothing.
        """
        seal = {"certificate": "c", "key": "K", "signature": "s"}
        hello = Hello.parse(obj(protocol=2, role="producer", service="stt", key="", models=["m"],
                                seal=seal, early_seal=True))
        self.assertTrue(hello.earlySeal)
        self.assertEqual(hello.features, frozenset({"seal", "early_seal"}))
        self.assertEqual(Hello.parse(hello.payload()), hello)
        bare = Hello.parse(obj(protocol=2, role="producer", service="stt", key="k", models=["m"],
                               early_seal=True))
        self.assertEqual((bare.earlySeal, bare.features), (False, frozenset()))
        self.assertNotIn("early_seal", bare.payload())

    def test_languagesAsCodes(self) -> None:
        """
        A producer's languages become the codes jobs carry, each once; one
        Whisper does not know stays as given (the node may speak it), so
        that the list never shrinks to an empty one, which means any.
        """
        hello = Hello.parse(
            obj(protocol=2, role="producer", service="tts", key="k", models=["*"],
                languages=["en", "en_US", "German", "ewe"])
        )
        self.assertEqual(hello.languages, ("en", "de", "ewe"))
        hello = Hello.parse(
            obj(protocol=2, role="producer", service="tts", key="k", models=["*"], languages=["*"])
        )
        self.assertEqual(hello.languages, ("*",))

    def test_consumerPayloadHasNoModels(self) -> None:
        payload = Hello("consumer", "tts", "k").payload()
        self.assertEqual(payload, {"protocol": 2, "role": "consumer", "service": "tts", "key": "k"})

    def test_wrongVersionIsViolation(self) -> None:
        self.assertRaises(ProtocolViolation, Hello.parse, obj(protocol=1, role="consumer", service="stt"))

    def test_badRoleOrService(self) -> None:
        self.assertRaises(BadRequest, Hello.parse, obj(protocol=2, role="boss", service="stt"))
        self.assertRaises(BadRequest, Hello.parse, obj(protocol=2, role="consumer", service="ocr"))

    def test_producerNeedsModels(self) -> None:
        self.assertRaises(BadRequest, Hello.parse, obj(protocol=2, role="producer", service="stt", key="k"))

    def test_badTypes(self) -> None:
        self.assertRaises(BadRequest, Hello.parse, obj(protocol=2, role="consumer", service="stt", key=5))
        self.assertRaises(
            BadRequest, Hello.parse,
            obj(protocol=2, role="producer", service="stt", key="k", models="whisper"),
        )


class JobRequestTests(SynchronousTestCase):
    def test_stt(self) -> None:
        request = JobRequest.parse("stt", obj(model="m", language="en", format="wav", size=10))
        self.assertEqual((request.model, request.language, request.format, request.size), ("m", "en", "wav", 10))
        self.assertEqual(
            request.payload("id1"),
            {"id": "id1", "model": "m", "language": "en", "size": 10, "format": "wav"},
        )

    def test_languageNames(self) -> None:
        """
        A language by name or with a region travels on as its code; an
        unknown one fails the job.
        """
        for given in ("English", "ENGLISH", " en ", "en-US"):
            request = JobRequest.parse("stt", obj(model="m", language=given, size=10))
            self.assertEqual(request.language, "en", given)
            self.assertEqual(request.payload("j")["language"], "en", given)
        request = JobRequest.parse("tts", obj(model="m", language="French", text="Salut.", size=0))
        self.assertEqual(request.language, "fr")
        e = self.assertRaises(
            BadRequest, JobRequest.parse, "stt", obj(model="m", language="Klingon", size=10)
        )
        self.assertEqual(e.code, ErrorCode.BAD_REQUEST)
        self.assertIn("unknown language 'Klingon'", e.message)

    def test_sttTaskPromptTemperature(self) -> None:
        request = JobRequest.parse(
            "stt", obj(model="m", size=1, task="translate", prompt="Names.", temperature=0.5)
        )
        self.assertEqual((request.task, request.prompt, request.temperature, request.needs),
                         ("translate", "Names.", 0.5, frozenset({"translate"})))
        payload = request.payload("j")
        self.assertEqual((payload["task"], payload["prompt"], payload["temperature"]),
                         ("translate", "Names.", 0.5))
        plain = JobRequest.parse("stt", obj(model="m", size=1, task="transcribe"))
        self.assertEqual((plain.task, plain.needs), (None, frozenset()))
        self.assertNotIn("task", plain.payload("j"))
        for bad in ({"task": "summarize"}, {"temperature": 2}, {"temperature": True},
                    {"prompt": 7}, {"prompt": "x" * 2001}):
            self.assertRaises(BadRequest, JobRequest.parse, "stt", obj(model="m", size=1, **bad))

    def test_sttWords(self) -> None:
        """
        C{"words": true} asks the producer to time each word: parsed and
        forwarded in the clear (sealed jobs too); absent or false, it is
        not sent at all; anything else fails the job. TTS jobs have none.
        """
        request = JobRequest.parse("stt", obj(model="m", size=1, words=True))
        self.assertTrue(request.words)
        self.assertIs(request.payload("j")["words"], True)
        self.assertEqual(JobRequest.parse("stt", request.payload("j")), request)
        sealed = JobRequest.parse(
            "stt", obj(model="m", size=9, words=True, seal={"ephemeral": "k"})
        )
        self.assertIs(sealed.payload("j")["words"], True)
        self.assertIsNone(sealed.sealedFor)
        for fields in (obj(model="m", size=1), obj(model="m", size=1, words=False),
                       obj(model="m", size=1, words=None)):
            request = JobRequest.parse("stt", fields)
            self.assertFalse(request.words, fields)
            self.assertNotIn("words", request.payload("j"))
        for bad in ("true", 1, 0, [True], {}):
            e = self.assertRaises(
                BadRequest, JobRequest.parse, "stt", obj(model="m", size=1, words=bad)
            )
            self.assertEqual(e.message, "field 'words' must be true or false")
        tts = JobRequest.parse("tts", obj(model="m", size=0, text="Hi.", words=True))
        self.assertFalse(tts.words)
        self.assertNotIn("words", tts.payload("j"))

    def test_sttDefaults(self) -> None:
        request = JobRequest.parse("stt", obj(model="m", size=1))
        self.assertEqual((request.language, request.format, request.timeout_s), (None, "auto", None))

    def test_tts(self) -> None:
        request = JobRequest.parse(
            "tts", obj(model="piper:x", language="en", voice="p236", text="Hi.", size=0, timeout_s=3)
        )
        self.assertEqual(
            request.payload("j"),
            {"id": "j", "model": "piper:x", "language": "en", "size": 0,
             "text": "Hi.", "voice": "p236", "timeout_s": 3},
        )

    def test_ttsSpeed(self) -> None:
        """
        A TTS job's C{speed}, 0.25 to 4, forwarded in the clear (sealed
        jobs too); absent or null, none is sent; anything else fails the
        job.
        """
        request = JobRequest.parse("tts", obj(model="m", size=0, text="Hi.", speed=2))
        self.assertEqual(request.speed, 2.0)
        self.assertEqual(request.payload("j")["speed"], 2.0)
        self.assertEqual(JobRequest.parse("tts", request.payload("j")), request)
        sealed = JobRequest.parse("tts", obj(model="m", size=9, speed=0.25, seal={"ephemeral": "k"}))
        self.assertEqual(sealed.payload("j")["speed"], 0.25)
        for fields in (obj(model="m", size=0, text="Hi."), obj(model="m", size=0, text="Hi.", speed=None)):
            request = JobRequest.parse("tts", fields)
            self.assertIsNone(request.speed)
            self.assertNotIn("speed", request.payload("j"))
        for bad in (0.2, 4.01, "2", True, [2], float("nan")):
            e = self.assertRaises(
                BadRequest, JobRequest.parse, "tts", obj(model="m", size=0, text="Hi.", speed=bad)
            )
            self.assertEqual(e.message, "speed must be a number from 0.25 to 4")
        stt = JobRequest.parse("stt", obj(model="m", size=1, speed=2))
        self.assertNotIn("speed", stt.payload("j"))
        # A stream's sentences are spoken as they come: no speed.
        e = self.assertRaises(
            BadRequest, JobRequest.parse, "tts", obj(model="m", size=0, stream=True, speed=2)
        )
        self.assertEqual(e.message, "a streaming TTS job has no speed")

    def test_badRequests(self) -> None:
        cases = [
            ("stt", obj(size=1)),
            ("stt", obj(model="", size=1)),
            ("stt", obj(model=3, size=1)),
            ("stt", obj(model="m")),
            ("stt", obj(model="m", size=-1)),
            ("stt", obj(model="m", size=True)),
            ("stt", obj(model="m", size="10")),
            ("stt", obj(model="m", size=0)),
            ("stt", obj(model="m", size=1, format="mp9")),
            ("stt", obj(model="m", size=1, timeout_s=0)),
            ("stt", obj(model="m", size=1, timeout_s="5")),
            ("tts", obj(model="m", size=0)),
            ("tts", obj(model="m", size=0, text="   ")),
            ("tts", obj(model="m", size=5, text="hi")),
            ("tts", obj(model="m", size=0, text="hi", voice=1)),
            ("tts", obj(model="m", size=0, text="hi\x00there")),
            ("tts", obj(model="m", size=0, text="bell\x07")),
        ]
        for service, fields in cases:
            e = self.assertRaises(BadRequest, JobRequest.parse, service, fields)
            self.assertEqual(e.code, ErrorCode.BAD_REQUEST, (service, fields))


class SealedForTests(SynchronousTestCase):
    def test_sealedFor(self) -> None:
        """
        A job whose early upload is sealed for one node's key names it; the
        farm forwards it so, or, untargeted, to any node and not early.
        """
        request = JobRequest.parse("stt", obj(model="m", size=9, early=True,
                                              seal={"ephemeral": "E", "for": "K"}))
        self.assertEqual((request.sealedFor, request.early), ("K", True))
        self.assertEqual(request.payload("j")["seal"], {"ephemeral": "E", "for": "K"})
        self.assertEqual(request.needs, frozenset({"seal"}))
        other = request.untargeted()
        self.assertEqual((other.sealedFor, other.early, other.seal), (None, False, {"ephemeral": "E"}))
        self.assertEqual(request.payload()["early"], True)
        self.assertNotIn("early", other.payload())
        self.assertEqual(other.payload()["seal"], {"ephemeral": "E"})

    def test_malformed(self) -> None:
        for seal, early in [({"ephemeral": "E", "for": "K"}, None), ({"ephemeral": "E", "for": 5}, True),
                            ({"ephemeral": "E", "for": ""}, True), ({"for": "K"}, True),
                            ({"ephemeral": "E", "for": "K", "x": "y"}, True),
                            ({"ephemeral": "E", "for": "K" * 65}, True)]:
            with self.assertRaises(BadRequest, msg=seal) as caught:
                JobRequest.parse("stt", obj(model="m", size=9, early=early, seal=seal))
            self.assertIn("seal" if early else "early", caught.exception.message)


class OkayAndResultTests(SynchronousTestCase):
    def test_okayRoundTrip(self) -> None:
        okay = Okay("f", 10.0, 1024, 2048)
        self.assertEqual(Okay.parse(json.loads(json.dumps(okay.payload()))), okay)
        self.assertEqual(okay.payload()["protocol"], 2)

    def test_okayMissingField(self) -> None:
        self.assertRaises(ProtocolViolation, Okay.parse, {"farm": "f"})

    def test_okayEarlyUpload(self) -> None:
        """
        C{early_upload} round-trips; an older farm's OKAY has none (0), and
        a negative one counts as 0.
        """
        okay = Okay("f", 10.0, 1024, 2048, 512)
        self.assertEqual(Okay.parse(okay.payload()).early_upload, 512)
        older = {"farm": "f", "ping_interval": 10.0, "max_frame": 1024, "max_job_bytes": 2048}
        self.assertEqual(Okay.parse(older).early_upload, 0)
        self.assertEqual(Okay.parse(dict(older, early_upload=-5)).early_upload, 0)

    def test_earlyUpload(self) -> None:
        from privox.messages import earlyUpload

        self.assertEqual(earlyUpload({"size": 10}, 100), 0)
        self.assertEqual(earlyUpload({"size": 10, "early": False}, 100), 0)
        self.assertEqual(earlyUpload({"size": 10, "early": True}, 100), 10)
        self.assertEqual(earlyUpload({"size": 100, "early": True}, 100), 100)
        for bad in (0, 101, -1, "10", 1.5, True, None):
            self.assertRaises(ProtocolViolation, earlyUpload, {"size": bad, "early": True}, 100)
        self.assertRaises(ProtocolViolation, earlyUpload, {"size": 1, "early": True}, 0)

    def test_earlyIsTheConsumers(self) -> None:
        """
        C{early} is in the consumer's JOB_ and not in the one the producer
        gets (with an id).
        """
        request = JobRequest.parse("stt", {"model": "m", "size": 3, "early": True})
        self.assertTrue(request.early)
        self.assertIs(request.payload()["early"], True)
        self.assertNotIn("early", request.payload("job-1"))
        self.assertFalse(JobRequest.parse("stt", {"model": "m", "size": 3, "early": 1}).early)

    def test_resultSize(self) -> None:
        self.assertEqual(resultSize({"id": "x", "text": "hi"}), 0)
        self.assertEqual(resultSize({"id": "x", "size": 12}), 12)
        for bad in (-1, "3", 1.5, True):
            self.assertRaises(ProtocolViolation, resultSize, {"size": bad})
