"""
Sealing a job's content between consumer and node (privox.sealing) and the
identities that make a farm unable to stand in for a node (privox.identity):
what a farm in the middle could try, each refused.
"""

from __future__ import annotations

import os
import stat

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from privox.identity import (
    CERTIFICATE_LIFETIME,
    Certificate,
    ConnectionOffer,
    IdentityError,
    encodeKey,
    exchangePublicKey,
    loadOrCreateKey,
    publicBytes,
)
from privox.node.worker import SealedRun
from privox.sealing import (
    RECORD,
    REQUIRED,
    RESULT,
    UPLOAD,
    Ephemeral,
    Opener,
    SealBroken,
    SealPolicy,
    Unpacker,
    nodeKeys,
    packed,
    seal,
    sealedSize,
    unpack,
)

NOW = 1_800_000_000.0


def sealBytes(key: bytes, direction: bytes, *parts: bytes) -> bytes:
    return b"".join(seal(key, direction, *parts))


def keysFor(jobId: str = "0123456789abcdef"):
    node = X25519PrivateKey.generate()
    ephemeral = Ephemeral()
    return ephemeral.keys(jobId, node.public_key()), nodeKeys(node, jobId, ephemeral.public)


def openAll(key: bytes, direction: bytes, sealed: bytes, pieces: int = 1) -> bytes:
    opener = Opener(key, direction, len(sealed))
    out = []
    step = max(1, len(sealed) // pieces)
    for start in range(0, len(sealed), step):
        out += opener.feed(sealed[start : start + step])
    opener.finish()
    return b"".join(out)


class SealingTests(SynchronousTestCase):
    def test_bothSidesAgree(self) -> None:
        consumer, node = keysFor()
        self.assertEqual(consumer, node)
        self.assertNotEqual(consumer.upload, consumer.result)

    def test_roundTrip(self) -> None:
        keys, _ = keysFor()
        for size in (0, 1, RECORD - 1, RECORD, RECORD + 1, 3 * RECORD + 17):
            plain = os.urandom(size)
            sealed = sealBytes(keys.upload, UPLOAD, plain)
            self.assertEqual(len(sealed), sealedSize(size))
            self.assertEqual(openAll(keys.upload, UPLOAD, sealed), plain)
            # In any pieces, a byte at a time for the small ones.
            self.assertEqual(openAll(keys.upload, UPLOAD, sealed, len(sealed) if size < 200 else 7), plain)

    def test_inParts(self) -> None:
        """
        Fields and audio sealed as two parts, not copied together first:
        records straddle them, the stream is the same as of their join.
        """
        keys, _ = keysFor()
        head = packed({"text": "x" * 100})
        for size in (0, 5, RECORD - len(head), RECORD, 2 * RECORD + 3):
            body = os.urandom(size)
            sealed = sealBytes(keys.upload, UPLOAD, head, body)
            self.assertEqual(len(sealed), sealedSize(len(head) + size))
            self.assertEqual(unpack(openAll(keys.upload, UPLOAD, sealed, 5)), ({"text": "x" * 100}, body))

    def test_noPlaintextInside(self) -> None:
        keys, _ = keysFor()
        plain = b"the quick brown fox " * 100
        self.assertNotIn(b"quick", sealBytes(keys.upload, UPLOAD, plain))

    def test_bitFlipped(self) -> None:
        keys, _ = keysFor()
        sealed = bytearray(sealBytes(keys.upload, UPLOAD, b"hello world"))
        sealed[10] ^= 1
        with self.assertRaises(SealBroken):
            openAll(keys.upload, UPLOAD, bytes(sealed))

    def records(self, sealed: bytes) -> list[bytes]:
        out = []
        while sealed:
            length = int.from_bytes(sealed[:4], "big")
            out.append(sealed[: 4 + length])
            sealed = sealed[4 + length :]
        return out

    def test_reordered(self) -> None:
        keys, _ = keysFor()
        records = self.records(sealBytes(keys.upload, UPLOAD, os.urandom(3 * RECORD)))
        swapped = records[1] + records[0] + records[2]
        with self.assertRaises(SealBroken):
            openAll(keys.upload, UPLOAD, swapped)

    def test_truncated(self) -> None:
        """
        Dropping the last record (and announcing that much less) is seen:
        the one before it was not sealed as the last.
        """
        keys, _ = keysFor()
        records = self.records(sealBytes(keys.upload, UPLOAD, os.urandom(2 * RECORD)))
        with self.assertRaises(SealBroken):
            openAll(keys.upload, UPLOAD, records[0])
        opener = Opener(keys.upload, UPLOAD, len(records[0]) + len(records[1]))
        opener.feed(records[0])
        with self.assertRaises(SealBroken):
            opener.finish()

    def test_repeated(self) -> None:
        keys, _ = keysFor()
        records = self.records(sealBytes(keys.upload, UPLOAD, os.urandom(2 * RECORD)))
        with self.assertRaises(SealBroken):
            openAll(keys.upload, UPLOAD, records[0] + records[0] + records[1])

    def test_replayedFromAnotherJob(self) -> None:
        """
        The same node, the same content, another job: other keys.
        """
        node = X25519PrivateKey.generate()
        first, second = Ephemeral(), Ephemeral()
        old = first.keys("job-one", node.public_key())
        new = nodeKeys(node, "job-two", second.public)
        sealed = sealBytes(old.upload, UPLOAD, b"transcribe me")
        with self.assertRaises(SealBroken):
            openAll(new.upload, UPLOAD, sealed)
        # Nor does the same ephemeral key under another job id open it.
        with self.assertRaises(SealBroken):
            openAll(nodeKeys(node, "job-two", first.public).upload, UPLOAD, sealed)

    def test_sealedEarly(self) -> None:
        """
        Sealed before the job had an id (for the node named in JOB_): both
        sides agree, and the keys are not those of any job id, the empty
        one included, with the same two keys.
        """
        node = X25519PrivateKey.generate()
        ephemeral = Ephemeral()
        early = ephemeral.keys(None, node.public_key())
        self.assertEqual(nodeKeys(node, None, ephemeral.public), early)
        sealed = sealBytes(early.upload, UPLOAD, b"transcribe me")
        self.assertEqual(openAll(early.upload, UPLOAD, sealed), b"transcribe me")
        for jobId in ("", "0123456789abcdef"):
            keys = nodeKeys(node, jobId, ephemeral.public)
            self.assertNotEqual(keys, early)
            with self.assertRaises(SealBroken):
                openAll(keys.upload, UPLOAD, sealed)

    def test_directionsDiffer(self) -> None:
        keys, _ = keysFor()
        sealed = sealBytes(keys.upload, UPLOAD, b"x")
        with self.assertRaises(SealBroken):
            openAll(keys.result, RESULT, sealed)
        with self.assertRaises(SealBroken):
            openAll(keys.upload, RESULT, sealed)

    def test_moreThanAnnounced(self) -> None:
        keys, _ = keysFor()
        sealed = sealBytes(keys.upload, UPLOAD, b"x")
        opener = Opener(keys.upload, UPLOAD, len(sealed) - 1)
        with self.assertRaises(SealBroken):
            opener.feed(sealed)

    def test_lowOrderKey(self) -> None:
        zero = X25519PublicKey.from_public_bytes(b"\x00" * 32)
        with self.assertRaises(SealBroken):
            Ephemeral().keys("job", zero)

    def test_packing(self) -> None:
        plain = packed({"text": "Grüße"}) + b"\x00\x01audio"
        self.assertEqual(unpack(plain), ({"text": "Grüße"}, b"\x00\x01audio"))
        unpacker = Unpacker()
        body = b"".join(unpacker.feed(plain[i : i + 1]) for i in range(len(plain)))
        self.assertEqual((unpacker.fields, body), ({"text": "Grüße"}, b"\x00\x01audio"))
        for bad in (b"\x00\x00\x00\x02[]", b"\x00\x00\x00\x03{x}", b"\x00\x10\x00\x00{}"):
            with self.assertRaises(SealBroken):
                unpack(bad)


class RecordingRun:
    """
    A job run that keeps what it is fed, a feed each.
    """

    def __init__(self, job: dict) -> None:
        self.job = job
        self.feeds: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        self.feeds.append(chunk)

    def finish(self) -> Deferred:
        return succeed(b"".join(self.feeds))


class RecordingHandler:
    models = ("digest:test",)
    languages = ()
    streams = False

    def __init__(self) -> None:
        self.runs: list[RecordingRun] = []

    def start(self, job: dict) -> RecordingRun:
        self.runs.append(RecordingRun(job))
        return self.runs[-1]


class SealedRunTests(SynchronousTestCase):
    """
    A node's sealed job (L{privox.node.worker.SealedRun}) opens its upload
    as it arrives and feeds the engine's run.
    """

    def sealedJob(self, size: int) -> tuple[bytes, bytes, SealedRun, RecordingHandler]:
        consumer, node = keysFor()
        body = os.urandom(size)
        sealed = sealBytes(consumer.upload, UPLOAD, packed({"language": "en"}), body)
        handler = RecordingHandler()
        run = SealedRun(handler, {"id": "j", "size": len(sealed), "seal": {}}, node, len(sealed))
        return body, sealed, run, handler

    def test_oneFeedPerChunk(self) -> None:
        """
        A chunk holding several records is one feed, not one per record: a
        streaming engine takes each feed in a thread of its own.
        """
        body, sealed, run, handler = self.sealedJob(3 * RECORD + 100)
        run.feed(sealed)
        [started] = handler.runs
        self.assertEqual(started.feeds, [body])
        self.assertEqual(started.job["language"], "en")
        self.assertEqual(started.job["size"], len(body))

    def test_inPieces(self) -> None:
        """
        Fed in pieces that cut records anywhere (7 bytes, and a byte at a
        time near the start), the engine gets the body whole and in order.
        """
        body, sealed, run, handler = self.sealedJob(2 * RECORD + 3)
        cuts = [*range(0, 64), *range(64, len(sealed), 7919), len(sealed)]
        for start, end in zip(cuts, cuts[1:]):
            run.feed(sealed[start:end])
        self.assertEqual(self.successResultOf(run.finish()), body)


class IdentityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.exchange = Ed25519PrivateKey.generate()
        self.node = Ed25519PrivateKey.generate()
        self.certificate = Certificate.issue(
            self.exchange, publicBytes(self.node.public_key()), "a1b2c3d4e5f6", NOW
        )

    def test_offerVerifies(self) -> None:
        private, offer = ConnectionOffer.make(self.node, self.certificate)
        parsed = ConnectionOffer.parse(offer.fields())
        certificate, key = parsed.verify(self.exchange.public_key(), NOW + 60)
        self.assertEqual(certificate.account, "a1b2c3d4e5f6")
        self.assertEqual(publicBytes(key), publicBytes(private.public_key()))

    def test_otherExchange(self) -> None:
        """
        A farm's own "exchange" cannot certify a key of its own.
        """
        impostor = Ed25519PrivateKey.generate()
        forged = Certificate.issue(impostor, publicBytes(self.node.public_key()), "x", NOW)
        _, offer = ConnectionOffer.make(self.node, forged)
        with self.assertRaises(IdentityError):
            offer.verify(self.exchange.public_key(), NOW)

    def test_swappedConnectionKey(self) -> None:
        """
        A genuine certificate with a connection key the node did not sign
        (one the farm holds) is refused.
        """
        _, offer = ConnectionOffer.make(self.node, self.certificate)
        farmKey = publicBytes(X25519PrivateKey.generate().public_key())
        fields = dict(offer.fields(), key=encodeKey(farmKey))
        with self.assertRaises(IdentityError):
            ConnectionOffer.parse(fields).verify(self.exchange.public_key(), NOW)

    def test_expired(self) -> None:
        _, offer = ConnectionOffer.make(self.node, self.certificate)
        offer.verify(self.exchange.public_key(), NOW + CERTIFICATE_LIFETIME - 1)
        with self.assertRaises(IdentityError):
            offer.verify(self.exchange.public_key(), NOW + CERTIFICATE_LIFETIME)

    def test_malformed(self) -> None:
        for fields in (None, [], {}, {"certificate": "x", "key": "y", "signature": "z"},
                       dict(ConnectionOffer.make(self.node, self.certificate)[1].fields(),
                            certificate="a.b.c")):
            with self.assertRaises(IdentityError):
                ConnectionOffer.parse(fields).verify(self.exchange.public_key(), NOW)
        text = self.certificate.text
        body, signature = text.split(".")
        with self.assertRaises(IdentityError):
            Certificate.verify(body[:-2] + "AA." + signature, self.exchange.public_key(), NOW)

    def test_policyChecksAnOfferOnce(self) -> None:
        """
        The offer a node's connection makes for every job is checked once,
        until its certificate expires; any other offer is checked afresh.
        """
        policy = SealPolicy(REQUIRED, self.exchange.public_key())
        private, offer = ConnectionOffer.make(self.node, self.certificate)
        verified = []
        real = ConnectionOffer.verify
        self.patch(ConnectionOffer, "verify", lambda o, *a: verified.append(o) or real(o, *a))
        for _ in range(3):
            key = policy.nodeKey(offer.fields(), NOW)
        self.assertEqual(publicBytes(key), publicBytes(private.public_key()))
        self.assertEqual(len(verified), 1)
        swapped = dict(offer.fields(), key=encodeKey(publicBytes(X25519PrivateKey.generate().public_key())))
        with self.assertRaises(IdentityError):
            policy.nodeKey(swapped, NOW)
        with self.assertRaises(IdentityError):
            policy.nodeKey(offer.fields(), NOW + CERTIFICATE_LIFETIME)  # expired: checked again

    def test_exchangeKeyText(self) -> None:
        text = encodeKey(publicBytes(self.exchange.public_key()))
        pinned = exchangePublicKey(text + "\n")
        Certificate.verify(self.certificate.text, pinned, NOW)
        with self.assertRaises(IdentityError):
            exchangePublicKey("not a key")

    def test_keyFileKeptAcrossRestarts(self) -> None:
        path = os.path.join(self.mktemp(), "state", "identity.key")
        first = loadOrCreateKey(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        again = loadOrCreateKey(path)
        self.assertEqual(publicBytes(first.public_key()), publicBytes(again.public_key()))
        with open(path, "w") as f:
            f.write("garbage\n")
        with self.assertRaises(IdentityError):
            loadOrCreateKey(path)
