"""
TLS between farms and their peers, on real loopback sockets: a farm on an
C{ssl:} server endpoint with a certificate from a throwaway CA made here; a
node and the API's farm exchange dialling it with C{tls:} client endpoints
and the exchange's CA (C{ca} setting, or Twisted's C{trustRoots=DIR}); and a
wrong hostname, an expired certificate and an unknown CA each refused with a
log line that says why.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.api.farmlist import FarmEntry
from privox.api.farms import FarmExchange
from privox.api.service import Options as ApiOptions
from privox.consumer import connectConsumer
from privox.farm.connection import RELAY_BUFFER, FarmFactory
from privox.farm.farm import Farm
from privox.farm.settings import FarmSettings
from privox.farm.splice import splicerFor
from privox.framing import DEFAULT_MAX_FRAME, HEADER_LEN, socketTransport
from privox.keys import OpenPolicy
from privox.engines.digest import digestOf, toneFor
from privox.node.service import Options as NodeOptions
from privox.tls import checkEndpoint, loadCA
from tests.support import recorded, until
from tests.test_logs import assertNoAddress, breakReads, unhandledError
from tests.test_node import nodeSettings, producers, startNode

_NOW = datetime.datetime.now(datetime.timezone.utc)
_DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Authority:
    """
    A throwaway certificate authority.
    """

    def __init__(self, name: str) -> None:
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - _DAY)
            .not_valid_after(_NOW + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        names: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
        notBefore: datetime.datetime = _NOW - _DAY,
        notAfter: datetime.datetime = _NOW + 30 * _DAY,
    ) -> tuple[bytes, bytes]:
        """
        A farm's certificate and key, PEM.
        """
        key = _key()
        san = [x509.DNSName(n) for n in names] + [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(notBefore)
            .not_valid_after(notAfter)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem(key)


class Files:
    """
    PEM files in a test's temporary directory.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self.root = FilePath(test.mktemp())
        self.root.makedirs()

    def write(self, name: str, content: bytes) -> str:
        path = self.root.preauthChild(name)
        path.parent().makedirs(ignoreExistingDirectory=True)
        path.setContent(content)
        return path.path


# One exchange CA and one stranger's for the module.
EXCHANGE_CA = Authority("Privox test exchange CA")
OTHER_CA = Authority("Somebody else's CA")


class TLSFarm:
    """
    A farm listening on C{ssl:} server endpoints (the strings C{--stt-listen}
    takes) on ephemeral loopback ports.
    """

    def __init__(self, certFile: str, keyFile: str) -> None:
        self.farm = Farm(FarmSettings(stats_interval=0.0), reactor, OpenPolicy(), OpenPolicy())
        # As twistd's farm has it; TLS connections must not be spliced.
        self.farm.splicer = splicerFor(self.farm.settings.splice_min, reactor)
        self.listen = f"ssl:0:interface=127.0.0.1:privateKey={keyFile}:certKey={certFile}"
        self.ports: dict[str, Any] = {}
        #: Every connection the farm accepted, in order.
        self.connections: list[Any] = []

    async def start(self) -> None:
        for service in ("stt", "tts"):
            endpoint = serverFromString(reactor, self.listen)
            self.ports[service] = await endpoint.listen(
                recorded(FarmFactory(self.farm, service), self.connections)
            )

    def endpoint(self, service: str, host: str = "localhost", extra: str = "") -> str:
        return f"tls:host={host}:port={self.ports[service].getHost().port}{extra}"

    async def stop(self) -> None:
        for port in self.ports.values():
            await port.stopListening()
        await self.farm.shutdown()


class _TLSTestCase(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.files = Files(self)
        self.caFile = self.files.write("ca/exchange-ca.pem", EXCHANGE_CA.pem())
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def farmWith(self, cert: tuple[bytes, bytes]) -> TLSFarm:
        certFile = self.files.write("farm/cert.pem", cert[0])
        keyFile = self.files.write("farm/key.pem", cert[1])
        farm = TLSFarm(certFile, keyFile)
        await farm.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(farm.stop()))
        return farm

    def logged(self, fragment: str) -> list[str]:
        return [m for m in (formatEvent(e) for e in self.events) if fragment in m]


class ConnectTests(_TLSTestCase):
    """
    A farm certificate from the exchange's CA, for localhost and 127.0.0.1.
    """

    async def test_nodeServesWithCA(self) -> None:
        """
        A node whose C{ca} is the exchange's CA connects to the farm by
        hostname and by IP address, and serves a job.
        """
        farm = await self.farmWith(EXCHANGE_CA.issue())
        node = startNode(
            self,
            nodeSettings(
                stt=("digest:x",), tts=("tone:x",), slots=1,
                stt_farm=(farm.endpoint("stt"),), tts_farm=(farm.endpoint("tts", host="127.0.0.1"),),
                ca=self.caFile,
            ),
        )
        await node.ready
        await until(lambda: producers(farm, "stt") == 1 and producers(farm, "tts") == 1, "slots")
        # A consumer with Twisted's own trustRoots=DIR (a directory of PEM files).
        trustRoots = f":trustRoots={self.files.root.child('ca').path}"
        stt = await connectConsumer(reactor, farm.endpoint("stt", extra=trustRoots), "stt")
        # Large enough to be spliced between plain TCP peers (TLS bytes must
        # go through the farm's memory to be decrypted), and more than one
        # DATA frame, which a TLS consumer writes a frame at a time.
        audio = b"\x00\x01" * 1_300_000
        result = await stt.stt("digest:x", audio)
        self.assertEqual(result.text, f"sha256:{digestOf(audio)} bytes:{len(audio)}")
        self.assertEqual(farm.farm.splicer.relays, 0)
        stt.transport.loseConnection()
        await node.stopService()
        self.assertTrue(self.logged("serving stt through tls:host=localhost"))

    async def test_apiRunsJobsWithCA(self) -> None:
        """
        The API's farm exchange with the exchange's CA runs STT and TTS jobs
        through a TLS farm.
        """
        farm = await self.farmWith(EXCHANGE_CA.issue())
        # A producer over TLS too, with the CA given as the node would.
        node = startNode(
            self,
            nodeSettings(stt=("digest:x",), tts=("tone:x",), slots=1,
                         stt_farm=(farm.endpoint("stt"),), tts_farm=(farm.endpoint("tts"),),
                         ca=self.caFile),
        )
        await node.ready
        await until(lambda: producers(farm, "stt") == 1 and producers(farm, "tts") == 1, "slots")
        entry = FarmEntry.parse(f"secure {farm.endpoint('stt')} {farm.endpoint('tts')}")
        exchange = FarmExchange([entry], reactor, ca=loadCA(self.caFile))
        self.addCleanup(exchange.stop)
        audio = b"speech" * 100
        result = await exchange.transcribe("digest:x", "en", audio, "auto")
        self.assertEqual(result.text, f"sha256:{digestOf(audio)} bytes:{len(audio)}")
        spoken = await exchange.synthesize("tone:x", "en", None, "over TLS")
        self.assertEqual(spoken.wav, toneFor("over TLS"))
        await node.stopService()

    async def test_socketBuffersUnderTLS(self) -> None:
        """
        The buffer sizes the farm and its peers set (L{tuneTransport}) reach
        the TCP socket under TLS, not only the TLS wrapper: with Twisted's
        64 KiB default a TLS relay paused its source every 64 KiB.
        """
        farm = await self.farmWith(EXCHANGE_CA.issue())
        trustRoots = f":trustRoots={self.files.root.child('ca').path}"
        consumer = await connectConsumer(reactor, farm.endpoint("stt", extra=trustRoots), "stt")
        self.addCleanup(consumer.transport.loseConnection)
        [connection] = farm.connections
        for protocol, size in ((consumer, 2 * (DEFAULT_MAX_FRAME + HEADER_LEN)),
                               (connection, RELAY_BUFFER)):
            self.assertIsInstance(protocol.transport, TLSMemoryBIOProtocol)
            self.assertEqual(socketTransport(protocol.transport).bufferSize, size)


    async def test_errorsNameNoAddress(self) -> None:
        """
        What a TLS peer's connection raises is logged without its address
        (the prefix of the TCP connection under the wrapper is the one used).
        """
        farm = await self.farmWith(EXCHANGE_CA.issue())
        trustRoots = f":trustRoots={self.files.root.child('ca').path}"
        consumer = await connectConsumer(reactor, farm.endpoint("stt", extra=trustRoots), "stt")
        self.addCleanup(consumer.transport.loseConnection)
        [connection] = farm.connections
        breakReads(connection)
        consumer.transport.write(b"PING00000000")
        event = await unhandledError(self, self.events)
        self.assertRegex(event["log_system"], r"^FarmConnection \(BufferingTLSTransport\),\d+$")
        assertNoAddress(self, self.events)


class RefusedTests(_TLSTestCase):
    """
    A bad certificate is refused by nodes and API servers alike, and the log
    says what is wrong with it.
    """

    async def _nodeRefuses(self, cert: tuple[bytes, bytes], host: str, why: str) -> None:
        farm = await self.farmWith(cert)
        node = startNode(
            self,
            nodeSettings(stt=("digest:x",), tts=(), slots=1, retry_max=5.0,
                         stt_farm=(farm.endpoint("stt", host=host),), ca=self.caFile),
        )
        await node.ready
        await until(lambda: self.logged(why), f"a log line saying {why!r}")
        self.assertEqual(producers(farm, "stt"), 0)
        line = self.logged(why)[0]
        self.assertIn("refused this node", line)
        self.assertIn("TLS", line)
        await node.stopService()

    async def _apiRefuses(self, cert: tuple[bytes, bytes], host: str, why: str) -> None:
        farm = await self.farmWith(cert)
        entry = FarmEntry.parse(f"secure {farm.endpoint('stt', host=host)} none")
        exchange = FarmExchange([entry], reactor, ca=loadCA(self.caFile), connectTimeout=10)
        self.addCleanup(exchange.stop)
        error = await Deferred.fromCoroutine(
            exchange.transcribe("digest:x", "en", b"audio", "auto")
        ).addErrback(lambda f: f.value)
        self.assertEqual(getattr(error, "status", None), 503, repr(error))
        lines = self.logged(why)
        self.assertTrue(lines, f"no log line saying {why!r} in {self.logged('')}")
        self.assertIn("farm secure unreachable (TLS", lines[0])

    async def test_wrongHostname(self) -> None:
        """
        A certificate for another host: the hostname check refuses it.
        """
        cert = EXCHANGE_CA.issue(names=("farm.elsewhere.example",), ips=())
        why = "does not match the hostname"
        await self._bothRefuse(cert, why, "localhost")

    async def test_wrongIPAddress(self) -> None:
        """
        Dialled by an IP address the certificate does not name.
        """
        cert = EXCHANGE_CA.issue(names=("localhost",), ips=())
        await self._bothRefuse(cert, "does not match the hostname", "127.0.0.1")

    async def test_expired(self) -> None:
        cert = EXCHANGE_CA.issue(notBefore=_NOW - 30 * _DAY, notAfter=_NOW - _DAY)
        await self._bothRefuse(cert, "the farm's certificate has expired", "localhost")

    async def test_notYetValid(self) -> None:
        cert = EXCHANGE_CA.issue(notBefore=_NOW + _DAY, notAfter=_NOW + 30 * _DAY)
        await self._bothRefuse(cert, "the farm's certificate is not valid yet", "localhost")

    async def test_unknownCA(self) -> None:
        cert = OTHER_CA.issue()
        await self._bothRefuse(cert, "is signed by an unknown CA", "localhost")

    async def _bothRefuse(self, cert: tuple[bytes, bytes], why: str, host: str) -> None:
        await self._nodeRefuses(cert, host, why)
        self.events.clear()
        await self._apiRefuses(cert, host, why)

    async def test_systemTrustByDefault(self) -> None:
        """
        Without C{ca}, a C{tls:} endpoint trusts the system's CAs only.
        """
        farm = await self.farmWith(EXCHANGE_CA.issue())
        entry = FarmEntry.parse(f"secure {farm.endpoint('stt')} none")
        exchange = FarmExchange([entry], reactor)
        self.addCleanup(exchange.stop)
        await Deferred.fromCoroutine(
            exchange.transcribe("digest:x", "en", b"audio", "auto")
        ).addErrback(lambda f: None)
        self.assertTrue(self.logged("is signed by an unknown CA"), self.logged(""))

    async def test_endpointTrustRootsOverrideCA(self) -> None:
        farm = await self.farmWith(OTHER_CA.issue())
        other = self.files.write("other/other-ca.pem", OTHER_CA.pem())
        endpoint = farm.endpoint("stt", extra=f":trustRoots={FilePath(other).parent().path}")
        entry = FarmEntry.parse(f"secure {endpoint} none")
        exchange = FarmExchange([entry], reactor, ca=loadCA(self.caFile))
        self.addCleanup(exchange.stop)
        node = startNode(
            self, nodeSettings(stt=("digest:x",), tts=(), slots=1, stt_farm=(endpoint,), ca=self.caFile)
        )
        await node.ready
        await until(lambda: producers(farm, "stt") == 1, "the node")
        result = await exchange.transcribe("digest:x", "en", b"abc", "auto")
        self.assertEqual(result.text, f"sha256:{digestOf(b'abc')} bytes:3")
        await node.stopService()


class SettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.files = Files(self)

    def test_loadCA(self) -> None:
        """
        A CA file may hold several certificates (a bundle); a directory's
        C{*.pem} files are read.
        """
        bundle = self.files.write("bundle.pem", EXCHANGE_CA.pem() + OTHER_CA.pem())
        self.assertEqual(len(loadCA(bundle)._caCerts), 2)
        self.files.write("dir/a.pem", EXCHANGE_CA.pem())
        self.files.write("dir/b.pem", OTHER_CA.pem())
        self.files.write("dir/readme.txt", b"not a certificate")
        self.assertEqual(len(loadCA(self.files.root.child("dir").path)._caCerts), 2)

    def test_badCA(self) -> None:
        empty = self.files.write("empty.pem", b"nothing here\n")
        self.assertRaises(ValueError, loadCA, empty)
        e = self.assertRaises(ValueError, loadCA, "/nonexistent/ca.pem")
        self.assertIn("cannot read CA file /nonexistent/ca.pem", str(e))

    def test_checkEndpoint(self) -> None:
        for good in ("tls:host=farm.example:port=1776", "tls:farm.example:1776",
                     "tcp:host=farm.example:port=1776", "tls:host=farm.example:port=1776:timeout=5"):
            checkEndpoint(good)
        for bad in ("tls:host=farm.example", "tls:farm.example:port", "nope:1",
                    "tls:host=a:port=1:trustRoots=/nonexistent"):
            self.assertRaises(ValueError, checkEndpoint, bad)

    def test_nodeOptions(self) -> None:
        ca = self.files.write("ca.pem", EXCHANGE_CA.pem())
        options = NodeOptions()
        options.parseOptions(
            ["--stt-farm", "tls:host=farm.example:port=1776", "--stt", "digest:x", "--ca", ca]
        )
        self.assertEqual(options.settings.ca, ca)
        for argv, fragment in (
            (["--ca", "/nonexistent/ca.pem"], "--ca: cannot read CA file"),
            (["--stt-farm", "tls:host=farm.example"], "bad farm endpoint"),
        ):
            e = self.assertRaises(
                usage.UsageError, NodeOptions().parseOptions,
                ["--stt-farm", "tcp:host=a:port=1", "--stt", "digest:x", *argv],
            )
            self.assertIn(fragment, str(e))

    def test_apiOptions(self) -> None:
        ca = self.files.write("ca.pem", EXCHANGE_CA.pem())
        farm = "--farm=main tls:host=farm.example:port=1776 tls:host=farm.example:port=1777"
        options = ApiOptions()
        options.parseOptions([farm, "--ca", ca])
        self.assertEqual(options.settings.ca, ca)
        self.assertIsNotNone(options.ca)
        e = self.assertRaises(
            usage.UsageError, ApiOptions().parseOptions, [farm, "--ca", "/nonexistent/ca.pem"]
        )
        self.assertIn("--ca: cannot read CA file", str(e))
