"""
TLS between API servers, farms and nodes.

Farms listen on Twisted's C{ssl:} server endpoints as they are
(C{ssl:1776:privateKey=key.pem:certKey=cert.pem}); nothing here is needed
for that. Nodes and API servers dial farms with client endpoint strings, and
L{clientEndpoint} is what they build them with: C{clientFromString}, except
for C{tls:} endpoints, which it builds itself so that

 - a C{--ca FILE} setting (a PEM file holding one or more CA certificates)
   becomes the trust root of every C{tls:} endpoint that names no
   C{trustRoots=DIR} of its own: a private exchange's CA in one setting,
   rather than a directory on every farm line;
 - a refused certificate says why (expired, unknown CA, wrong hostname...)
   in the log line of the failed connection, where OpenSSL alone reports a
   bare "certificate verify failed".

Verification is what Twisted's C{tls:} does: the context comes from
L{optionsForClientTLS} (trust root, the platform's CAs by default; SNI;
protocol versions and ciphers), OpenSSL checks the chain, and the leaf
certificate must name the host dialled (C{service_identity}). Only the
per-connection verify callback is ours (L{_Explaining}), replacing Twisted's
own, which checks the same things but cannot say why it refused.

Why build the endpoint rather than rewrite the string to add
C{trustRoots=}: Twisted's C{trustRoots} takes a I{directory} of PEM files, so
a CA file would first have to be copied into a directory of its own, and the
verification error would still be OpenSSL's bare one.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.abstract import isIPAddress, isIPv6Address

# _parse is Twisted's own splitter of endpoint strings (colons, backslash
# escapes, key=value), the one clientFromString uses: a tls: string must mean
# here exactly what it means to Twisted.
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    _parse,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

#: What L{loadCA} gives: Twisted's IOpenSSLTrustRoot (not exported publicly).
TrustRoot = Any


class CertificateRefused(Exception):
    """
    The farm's certificate did not verify; the message says why.
    """


def loadCA(path: str) -> TrustRoot:
    """
    A trust root of the CA certificates in C{path}: a PEM file (one or more
    certificates), or a directory whose C{*.pem} files are read.

    @raise ValueError: unreadable, or no certificate in it.
    """
    where = FilePath(path)
    files = sorted(where.globChildren("*.pem")) if where.isdir() else [where]
    certificates = []
    for f in files:
        try:
            data = f.getContent()
        except OSError as e:
            raise ValueError(f"cannot read CA file {f.path}: {e.strerror}") from None
        try:
            found = x509.load_pem_x509_certificates(data)
        except ValueError:
            found = []
        certificates += [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in found]
    if not certificates:
        raise ValueError(f"no PEM certificate in {path}")
    return trustRootFromCertificates(certificates)


def clientEndpoint(
    reactor: Any, description: str, ca: TrustRoot | None = None
) -> IStreamClientEndpoint:
    """
    The client endpoint for C{description}, a Twisted endpoint string.

    C{tls:HOST:PORT} or C{tls:host=HOST:port=PORT} (with Twisted's other
    C{tls:} parameters: C{timeout}, C{bindAddress}, C{certificate},
    C{privateKey}, C{trustRoots}, C{endpoint}) verifies the farm's
    certificate against C{trustRoots=DIR} if given, else C{ca} if given, else
    the platform's CAs; and its hostname against C{HOST}.
    """
    args, kwargs = _parse(description)
    if not args or str(args[0]).lower() != "tls":
        return clientFromString(reactor, description)
    return _tlsEndpoint(reactor, ca, *args[1:], **kwargs)


def pinnedEndpoint(
    reactor: Any, tls: bool, host: str, address: str, port: int, ca: TrustRoot | None = None,
    timeout: float = 30,
) -> IStreamClientEndpoint:
    """
    Dial C{address} (an IPv4 address C{host} resolved to), and with C{tls}
    verify the farm's certificate against the name C{host} (and C{ca}, else
    the platform's CAs), as C{tls:host=HOST:port=PORT} would: what is
    checked about the address is what is dialled.
    """
    tcp = TCP4ClientEndpoint(reactor, address, port, timeout)
    if not tls:
        return tcp
    return wrapClientTLS(_Explaining(optionsForClientTLS(host, trustRoot=ca), host), tcp)


def _tlsEndpoint(
    reactor: Any,
    ca: TrustRoot | None,
    host: str,
    port: str,
    timeout: str = "30",
    bindAddress: str | None = None,
    certificate: str | None = None,
    privateKey: str | None = None,
    trustRoots: str | None = None,
    endpoint: str | None = None,
) -> IStreamClientEndpoint:
    trustRoot = loadCA(trustRoots) if trustRoots is not None else ca
    clientCertificate = None
    if certificate is not None:
        pem = FilePath(certificate).getContent()
        if privateKey is None:
            clientCertificate = PrivateCertificate.loadPEM(pem)
        else:
            clientCertificate = PrivateCertificate.fromCertificateAndKeyPair(
                Certificate.loadPEM(pem), KeyPair.load(FilePath(privateKey).getContent(), 1)
            )
    options = optionsForClientTLS(host, trustRoot=trustRoot, clientCertificate=clientCertificate)
    portNumber, seconds = int(port), int(timeout)
    if endpoint is not None:
        wrapped = clientEndpoint(reactor, endpoint)
    elif reactor is _CHECK:
        wrapped = None
    else:
        wrapped = HostnameEndpoint(
            reactor,
            host.encode("idna"),
            portNumber,
            seconds,
            None if bindAddress is None else (bindAddress, 0),
        )
    return wrapClientTLS(_Explaining(options, host), wrapped)


class _CheckOnly:
    """
    A stand-in reactor: endpoints are parsed and built, never connected.
    """


_CHECK = _CheckOnly()


def checkEndpoint(description: str, ca: TrustRoot | None = None) -> None:
    """
    Parse C{description} as L{clientEndpoint} would, without a reactor.

    @raise ValueError: it is not a client endpoint Twisted can connect with,
        or its files (C{trustRoots}, C{certificate}...) cannot be read.
    """
    try:
        clientEndpoint(_CHECK, description, ca)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{e or type(e).__name__}") from None


# X509_V_ERR_* codes an operator meets, in words.
_VERIFY_ERRORS = {
    9: "is not valid yet",
    10: "has expired",
    18: "is self-signed and not trusted",
    19: "chains to a self-signed CA that is not trusted",
    20: "is signed by an unknown CA",
    21: "is signed by an unknown CA",
    23: "has been revoked",
    24: "has an invalid CA certificate in its chain",
    26: "is not meant for a TLS server",
}


@implementer(IOpenSSLClientConnectionCreator)
class _Explaining:
    """
    Twisted's client connection creator (trust root, SNI, protocol versions)
    with a verify callback that checks what Twisted's own does (the chain,
    then the leaf's hostname or IP address with C{service_identity}) and puts
    the reason a certificate was refused into the connection's
    C{connectionLost}, through Twisted's C{failVerification}.
    """

    def __init__(self, inner: Any, host: str) -> None:
        self._inner = inner
        self._host = host
        self._isIP = isIPAddress(host) or isIPv6Address(host)

    def _identityError(self, cert: Any) -> str | None:
        certificate = cert.to_cryptography()
        try:
            if self._isIP:
                verify_certificate_ip_address(certificate, self._host)
            else:
                verify_certificate_hostname(certificate, self._host)
        except (VerificationError, CertificateError) as e:
            names = []
            try:
                san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                names = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
                names += [str(n) for n in san.value.get_values_for_type(x509.IPAddress)]
            except x509.ExtensionNotFound:
                pass
            return (
                f"the farm's certificate does not match the hostname {self._host!r} "
                f"(it is for {', '.join(names) or 'no name'}; {type(e).__name__})"
            )
        return None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        refused: list[str] = []

        def verify(conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
            if refused:
                return False
            try:
                if not ok:
                    what = _VERIFY_ERRORS.get(errno, f"failed verification (X509 error {errno})")
                    subject = cert.get_subject().CN or "?"
                    whose = (
                        "the farm's certificate"
                        if depth == 0
                        else f"CA certificate {subject!r} in the farm's chain"
                    )
                    refused.append(f"{whose} {what}")
                elif depth == 0:
                    mismatch = self._identityError(cert)
                    if mismatch is not None:
                        refused.append(mismatch)
            except BaseException as e:
                # An exception must not escape an OpenSSL callback.
                refused.append(f"the farm's certificate could not be checked ({e!r})")
            if refused:
                tlsProtocol.failVerification(
                    Failure(CertificateRefused(f"TLS: {refused[0]} (connecting to {self._host})"))
                )
                return False
            return True

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


def tlsReason(reason: Failure | None) -> str | None:
    """
    Why a connection was lost, in words, if it was TLS's doing; else L{None}.
    """
    if reason is None:
        return None
    error = reason.value
    if isinstance(error, CertificateRefused):
        return str(error)
    if isinstance(error, VerificationError):
        names = ", ".join(
            str(getattr(e, "mismatched_id", e)) for e in getattr(error, "errors", [])
        )
        return f"TLS: the farm's certificate does not match the hostname ({names})"
    if isinstance(error, SSL.Error):
        details = "; ".join(
            str(item[-1]) for item in (error.args[0] if error.args else []) if item
        )
        return f"TLS handshake failed: {details or error}"
    return None
