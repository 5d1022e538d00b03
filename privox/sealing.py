"""
A job's content sealed between the consumer (the API) and the node, so the
farm in between relays only ciphertext (docs/privacy.rst).

Keys: the consumer makes an ephemeral X25519 key per job and names its
public half in JOB_; once the farm assigns the job it learns the node's
connection key (checked against the exchange, L{privox.identity}). Both
sides then derive, with X25519 and HKDF-SHA256 bound to the job id and both
public keys, one ChaCha20-Poly1305 key per direction (L{JobKeys}).

Content: what a side sends (the upload; the answer) is one plaintext: its
content fields (the TTS text, the transcript...) as JSON (L{packed}), then
its bytes (audio); it is sealed as a stream of records, each a 4-byte
length and a ciphertext of at most L{RECORD} plaintext bytes. Record I is
sealed with nonce I and, as associated data, its direction, I and whether
it is the last: a farm that drops, reorders, repeats, cuts short, flips a
bit or replays a record of another job (other keys) makes L{Opener} fail.
The stream's size is known before it is sent (L{sealedSize}), as PVX/2's
JOB_ and RSLT announce it; its records need not match DATA frames.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privox.identity import ConnectionOffer, encodeKey, publicBytes

#: Plaintext bytes per record: large enough that the per-record cost is
#: noise, small enough that a streaming consumer gets pieces early.
RECORD = 64 * 1024
_TAG = 16
_LENGTH = struct.Struct(">I")
#: What each record adds to its plaintext.
OVERHEAD = _LENGTH.size + _TAG
UPLOAD = b"up"
RESULT = b"down"
_INFO = b"privox seal v1\x00"
#: Keys for an upload sealed before the farm named the job (§5.7): no job
#: id to salt them with, so a label of their own keeps them apart.
_EARLY_INFO = b"privox early seal v1\x00"
#: The most JSON a packed plaintext may start with.
MAX_FIELDS = 64 * 1024


#: The consumer's policies (privox-api --e2e).
REQUIRED, PREFERRED, OFF = "required", "preferred", "off"
MODES = (REQUIRED, PREFERRED, OFF)


@dataclass(frozen=True)
class SealPolicy:
    """
    Whether a consumer seals its jobs: C{required} (only nodes that can
    seal take them), C{preferred} (sealed where the node can, else in the
    clear: PVX/1 and older nodes) or C{off}; and the exchange key that the
    nodes' certificates must be signed with.
    """

    mode: str = OFF
    exchange: Ed25519PublicKey | None = None
    #: Offers already checked: a node's connection offers the same one for
    #: every job it takes, and checking costs two Ed25519 verifies.
    _checked: OrderedDict[tuple[str, ...], tuple[float, X25519PublicKey]] = field(
        default_factory=OrderedDict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"e2e must be one of {', '.join(MODES)}")
        if self.mode != OFF and self.exchange is None:
            raise ValueError("sealing needs the exchange's public key")

    def nodeKey(self, offer: Any, now: float) -> X25519PublicKey:
        """
        The connection key of the node that made C{offer} (a seal offer from
        ASGN), if the exchange vouches for the node and the node signed the
        key (L{ConnectionOffer.verify}); an offer checked before is not
        checked again until its certificate expires.

        @raise IdentityError: it does not hold.
        """
        parsed = ConnectionOffer.parse(offer)
        cacheKey = (parsed.certificate, encodeKey(parsed.key), encodeKey(parsed.signature))
        known = self._checked.get(cacheKey)
        if known is not None and now < known[0]:
            return known[1]
        assert self.exchange is not None
        certificate, key = parsed.verify(self.exchange, now)
        self._checked[cacheKey] = (certificate.expires, key)
        while len(self._checked) > MAX_CHECKED_OFFERS:
            self._checked.popitem(last=False)
        return key


class Sealer(Protocol):
    """
    What a node seals with (L{privox.node.enrolment}): per connection, a
    fresh key and its offer, or L{None} while it holds no certificate.
    """

    def offer(self, farm: str | None = None) -> tuple[X25519PrivateKey, ConnectionOffer] | None:
        "Bound to C{farm} (its key id), if given: a farm that lets the node in by it."


#: How many checked offers a policy remembers (a node connection each).
MAX_CHECKED_OFFERS = 4096


class SealBroken(Exception):
    """
    Sealed content that does not open: changed, reordered, cut short,
    replayed, or sealed with other keys. The job must fail, not answer.
    """


@dataclass(frozen=True)
class JobKeys:
    upload: bytes
    result: bytes


def _derive(shared: bytes, jobId: str | None, ephemeral: bytes, node: bytes) -> JobKeys:
    """
    The job's keys; C{jobId} L{None}: sealed early, before the job had an
    id. Either way the ephemeral key is the consumer's for this one job, and
    a node refuses one it has seen (a farm replaying a job).
    """
    if jobId is None:
        salt, info = None, _EARLY_INFO
    else:
        salt, info = jobId.encode("utf-8"), _INFO
    material = HKDF(SHA256(), 64, salt=salt, info=info + ephemeral + node).derive(shared)
    return JobKeys(material[:32], material[32:])


class Ephemeral:
    """
    A consumer's key for one job: its public half goes in JOB_, the keys
    come once the node's connection key is known.
    """

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = publicBytes(self._private.public_key())

    def keys(self, jobId: str | None, node: X25519PublicKey) -> JobKeys:
        """
        The job's keys with C{node}'s connection key (C{jobId} L{None}: an
        upload sealed early, for the node named in C{JOB_}).

        @raise SealBroken: a node key no real node has (a low-order point).
        """
        try:
            shared = self._private.exchange(node)
        except ValueError:
            raise SealBroken("the node's key is not a usable X25519 key") from None
        return _derive(shared, jobId, self.public, publicBytes(node))


def nodeKeys(connection: X25519PrivateKey, jobId: str | None, ephemeral: bytes) -> JobKeys:
    """
    The node's side of L{Ephemeral.keys}: its connection key and the
    consumer's ephemeral public key from JOB_.

    @raise SealBroken: not a usable X25519 key.
    """
    try:
        shared = connection.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    except ValueError:
        raise SealBroken("the consumer's key is not a usable X25519 key") from None
    return _derive(shared, jobId, ephemeral, publicBytes(connection.public_key()))


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _aad(direction: bytes, index: int, last: bool) -> bytes:
    return direction + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")


def _records(size: int) -> int:
    return max(1, -(-size // RECORD))


def sealedSize(plainSize: int) -> int:
    """
    How many bytes L{seal} makes of C{plainSize} bytes.
    """
    return plainSize + _records(plainSize) * OVERHEAD


def plainSize(sealed: int) -> int:
    """
    How many plaintext bytes a sealed stream of C{sealed} bytes holds.
    """
    return sealed - max(1, -(-sealed // (RECORD + OVERHEAD))) * OVERHEAD


def seal(key: bytes, direction: bytes, *parts: bytes | memoryview) -> list[bytes]:
    """
    The plaintext C{parts} (joined, without being copied together: a
    L{packed} header and a MiB of audio) as a stream of sealed records:
    each record's length, then its ciphertext. Left in pieces (no buffer of
    the whole is made here): the frames they are sent in join them once
    (L{privox.peer.PeerProtocol.sendData}).
    """
    aead = ChaCha20Poly1305(key)
    size = sum(len(p) for p in parts)
    count = _records(size)
    views = [memoryview(p) for p in parts if len(p)]
    out: list[bytes] = []
    for index in range(count):
        # The next RECORD bytes of the parts: a slice of one, or (where
        # parts meet: the header and the first audio) a small join.
        pieces: list[memoryview] = []
        want = RECORD
        while views and want:
            head = views[0]
            pieces.append(head[:want])
            want -= len(pieces[-1])
            if len(head) <= len(pieces[-1]):
                views.pop(0)
            else:
                views[0] = head[len(pieces[-1]) :]
        piece: bytes | memoryview = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        sealed = aead.encrypt(_nonce(index), piece, _aad(direction, index, index == count - 1))
        out += (_LENGTH.pack(len(sealed)), sealed)
    return out


def _openRecord(
    aead: ChaCha20Poly1305, direction: bytes, index: int, record: bytes | memoryview, last: bool
) -> bytes:
    """
    The plaintext of the C{index}th record of a sealed stream.

    @raise SealBroken: it does not open (changed, moved, replayed, or its
        end claimed falsely).
    """
    try:
        return aead.decrypt(_nonce(index), record, _aad(direction, index, last))
    except InvalidTag:
        raise SealBroken("a sealed record does not open") from None


class Opener:
    """
    Opens a sealed stream of C{size} bytes as it arrives, in any pieces.
    """

    def __init__(self, key: bytes, direction: bytes, size: int) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._direction = direction
        self._remaining = size
        self._buffer = bytearray()
        self._index = 0
        self._done = False

    def feed(self, data: bytes) -> list[bytes]:
        """
        The plaintext of the records C{data} completes. Whole records are
        opened where they lie; only a record cut between two pieces is
        joined (reads of up to 512 KiB each cut one).

        @raise SealBroken: a record does not open, or more than was
            announced arrives.
        """
        if len(data) > self._remaining:
            raise SealBroken("more sealed bytes than were announced")
        self._remaining -= len(data)
        out: list[bytes] = []
        with memoryview(data) as view:
            offset = self._complete(view, out)
            while len(view) - offset >= _LENGTH.size:
                start = offset + _LENGTH.size
                length = self._length(view, offset)
                if len(view) - start < length:
                    break
                offset = start + length
                out.append(self._open(view[start:offset], offset == len(view)))
            if offset < len(view):
                self._buffer += view[offset:]
        return out

    def _complete(self, view: memoryview, out: list[bytes]) -> int:
        """
        Add to the record an earlier piece began what C{view} has of it,
        opening it if that is all; how many bytes of C{view} it took.
        """
        buffer = self._buffer
        if not buffer:
            return 0
        taken = min(max(0, _LENGTH.size - len(buffer)), len(view))
        buffer += view[:taken]
        if len(buffer) < _LENGTH.size:
            return taken
        more = min(_LENGTH.size + self._length(buffer, 0) - len(buffer), len(view) - taken)
        buffer += view[taken : taken + more]
        taken += more
        if len(buffer) == _LENGTH.size + self._length(buffer, 0):
            self._buffer = bytearray()
            out.append(self._open(memoryview(buffer)[_LENGTH.size :], taken == len(view)))
        return taken

    def _length(self, source: memoryview | bytearray, offset: int) -> int:
        (length,) = _LENGTH.unpack_from(source, offset)
        if not _TAG <= length <= RECORD + _TAG or self._done:
            raise SealBroken("a sealed record is malformed")
        return length

    def _open(self, record: memoryview, endsPiece: bool) -> bytes:
        # The last record is the one that ends the last piece.
        last = not self._remaining and endsPiece
        plain = _openRecord(self._aead, self._direction, self._index, record, last)
        self._index += 1
        self._done = last
        return plain

    def finish(self) -> None:
        """
        The stream is over: it must have ended with its last record.

        @raise SealBroken: it did not.
        """
        if not self._done:
            raise SealBroken("the sealed content was cut short")


class StreamSealer:
    """
    Seals a stream whose length is not known in advance (docs/protocol.rst
    §5.8): each piece as it comes, as records with at least one byte each,
    and at the end one empty record, the only one marked last.
    """

    def __init__(self, key: bytes, direction: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._direction = direction
        self._index = 0

    def _record(self, plain: bytes | memoryview, last: bool) -> list[bytes]:
        sealed = self._aead.encrypt(
            _nonce(self._index), plain, _aad(self._direction, self._index, last)
        )
        self._index += 1
        return [_LENGTH.pack(len(sealed)), sealed]

    def seal(self, *parts: bytes) -> list[bytes]:
        data = b"".join(parts)
        out: list[bytes] = []
        with memoryview(data) as view:
            for offset in range(0, len(view), RECORD):
                out += self._record(view[offset : offset + RECORD], False)
        return out

    def close(self) -> list[bytes]:
        return self._record(b"", True)


class StreamOpener:
    """
    Opens what a L{StreamSealer} made, in any pieces: an empty record ends
    the stream.
    """

    def __init__(self, key: bytes, direction: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._direction = direction
        self._buffer = bytearray()
        self._index = 0
        self.ended = False

    @property
    def atEdge(self) -> bool:
        "Whether every byte fed so far was part of a whole record."
        return not self._buffer

    def feed(self, data: bytes) -> list[bytes]:
        """
        @raise SealBroken: a record does not open, or bytes follow the end.
        """
        self._buffer += data
        out = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if not _TAG <= length <= RECORD + _TAG or self.ended:
                raise SealBroken("a sealed record is malformed")
            start = offset + _LENGTH.size
            if len(buffer) - start < length:
                break
            offset = start + length
            last = length == _TAG
            out.append(_openRecord(
                self._aead, self._direction, self._index, bytes(buffer[start:offset]), last
            ))
            self._index += 1
            self.ended = last
        del buffer[:offset]
        return [plain for plain in out if plain]

    def finish(self) -> None:
        """
        @raise SealBroken: the stream did not end with its last record.
        """
        if not self.ended or self._buffer:
            raise SealBroken("the sealed stream was cut short")


def packed(fields: dict[str, Any]) -> bytes:
    """
    What a side's content starts with: its fields as JSON, after their
    length. Its bytes (audio) follow: L{seal}C{(key, direction,
    packed(fields), body)}.
    """
    encoded = json.dumps(fields, separators=(",", ":")).encode("utf-8")
    return _LENGTH.pack(len(encoded)) + encoded


class Unpacker:
    """
    The fields, then the body bytes, of a packed plaintext as it opens.
    """

    def __init__(self) -> None:
        self._head = bytearray()
        self.fields: dict[str, Any] | None = None
        #: The bytes before the body (its length, then the fields).
        self.headerBytes = 0

    def feed(self, plain: bytes) -> bytes:
        """
        The body bytes in C{plain}; L{fields} is set once they are whole.

        @raise SealBroken: the fields are not a JSON object.
        """
        if self.fields is not None:
            return plain
        self._head += plain
        if len(self._head) < _LENGTH.size:
            return b""
        (length,) = _LENGTH.unpack_from(self._head)
        if length > MAX_FIELDS:
            raise SealBroken("sealed fields too long")
        if len(self._head) < _LENGTH.size + length:
            return b""
        try:
            fields = json.loads(bytes(self._head[_LENGTH.size : _LENGTH.size + length]))
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            raise SealBroken("sealed fields are not a JSON object")
        self.fields = fields
        self.headerBytes = _LENGTH.size + length
        body = bytes(self._head[_LENGTH.size + length :])
        self._head = bytearray()
        return body


def unpack(plain: bytes) -> tuple[dict[str, Any], bytes]:
    """
    L{pack} undone, for a plaintext that is all here.

    @raise SealBroken: it is not a packed plaintext.
    """
    unpacker = Unpacker()
    body = unpacker.feed(plain)
    if unpacker.fields is None:
        raise SealBroken("the sealed content was cut short")
    return unpacker.fields, body
