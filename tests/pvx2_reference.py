#!/usr/bin/env python3
"""
A PVX/2 peer written from ``docs/protocol.rst`` alone.

It deliberately imports nothing from the ``privox`` package (and nothing
outside the standard library), so that it can stand as an independent check
that the farm speaks the protocol the specification describes.

It is both a library and a command-line script::

    python tests/pvx2_reference.py consumer-stt HOST PORT FILE --model M
    python tests/pvx2_reference.py consumer-tts HOST PORT TEXT --model M -o out.wav
    python tests/pvx2_reference.py producer HOST PORT --service stt|tts [--jobs N]

The producer is a test engine: an STT job is answered with the text
``sha256:<hex digest of the audio>``, and a TTS job with a small WAV file
whose samples are derived from the SHA-256 of the text (see
:func:`reference_wav`), so that a consumer can check what it received.

Exit status of the script: 0 on success, 1 when a job failed (``FAIL``),
2 for bad usage, 3 when the farm answered ``DENY``, 4 for any other
connection or protocol error (including timeouts).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import select
import socket
import sys
import time
import wave
from typing import Any

GREETING = b"who"  # section 2.1
HEADER_SIZE = 12  # section 3
VERB_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
DIGITS = frozenset(b"0123456789")
VERBS = frozenset(
    ["HELO", "OKAY", "DENY", "PING", "PONG", "JOB_", "ASGN", "DATA", "RSLT", "FAIL", "CNCL"]
)
MAX_LENGTH_FIELD = 99999999
# Largest payload accepted before OKAY has announced the farm's max_frame, and
# the limit this peer assumes for its own frames until then (the default of §1).
DEFAULT_MAX_FRAME = 1048576
DEFAULT_MAX_JOB_BYTES = 52428800
READ_SIZE = 65536

DEFAULT_WAV_SAMPLES = 8000
DEFAULT_WAV_RATE = 16000


# --- errors ---------------------------------------------------------------


class PvxError(Exception):
    """
    Base class of every error this module raises.
    """


class ProtocolError(PvxError):
    """
    The farm sent something that PVX/2 does not allow (or this peer was told
    with ``FAIL protocol`` that it broke the protocol).
    """


class ConnectionClosed(PvxError):
    """
    The connection ended (or timed out) before the exchange was complete.
    """


class Denied(PvxError):
    """
    The farm answered ``HELO`` with ``DENY`` (section 2.5).
    """

    def __init__(self, code: Any, message: Any) -> None:
        super().__init__(f"DENY {code}: {message}")
        self.code = code
        self.message = message


class FarmFailure(PvxError):
    """
    A ``FAIL`` with ``"id": null`` that concerns the whole connection (a
    protocol error, the handshake timeout, or shutdown); the farm closes the
    connection after it (section 5.5).
    """

    def __init__(self, code: Any, message: Any) -> None:
        super().__init__(f"FAIL {code} (connection): {message}")
        self.code = code
        self.message = message


class JobFailed(PvxError):
    """
    A job ended with ``FAIL``. ``job_id`` is ``None`` when the farm refused
    the job before ``ASGN`` (section 5.2), otherwise the job's id.
    """

    def __init__(self, code: Any, message: Any, job_id: str | None) -> None:
        shown = "null" if job_id is None else job_id
        super().__init__(f"FAIL {code} (job id {shown}): {message}")
        self.code = code
        self.message = message
        self.job_id = job_id


# --- helpers --------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def encode_json(fields: dict[str, Any]) -> bytes:
    """
    One JSON object as compact UTF-8, refusing NaN and Infinity (section 3).
    """
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def decode_json(payload: bytes) -> dict[str, Any]:
    """
    A control payload: exactly one JSON object in UTF-8 (section 3).
    """
    try:
        text = payload.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise ProtocolError(f"control payload is not UTF-8 JSON: {e}") from None
    if not isinstance(value, dict):
        raise ProtocolError("control payload is not a JSON object")
    return value


def encode_frame(verb: str, payload: bytes = b"") -> bytes:
    """
    A 12-byte header (4-character verb, 8 zero-padded ASCII digits) and the payload.
    """
    if verb not in VERBS:
        raise ValueError(f"unknown verb {verb!r}")
    if len(payload) > MAX_LENGTH_FIELD:
        raise ValueError("payload too long for the length field")
    return verb.encode("ascii") + b"%08d" % len(payload) + payload


def check_header(header: bytes, limit: int) -> tuple[str, int]:
    """
    Validate a 12-byte header before its payload is buffered (section 3).
    Returns the verb and the payload length.
    """
    verb, digits = header[:4], header[4:12]
    if len(header) != HEADER_SIZE:
        raise ProtocolError("short frame header")
    if not all(c in VERB_CHARS for c in verb) or verb.decode("ascii") not in VERBS:
        raise ProtocolError(f"unknown verb {verb!r}")
    if not all(c in DIGITS for c in digits):
        raise ProtocolError(f"bad length field {digits!r}")
    length = int(digits)
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds max_frame {limit}")
    return verb.decode("ascii"), length


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def reference_samples(text: str, n_samples: int) -> bytes:
    """
    ``2 * n_samples`` bytes of 16-bit sample data derived from SHA-256 of the
    text: SHA-256 in counter mode, seeded with SHA-256 of the UTF-8 text.
    """
    seed = hashlib.sha256(text.encode("utf-8")).digest()
    out = bytearray()
    counter = 0
    while len(out) < 2 * n_samples:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[: 2 * n_samples])


def reference_wav(
    text: str, n_samples: int = DEFAULT_WAV_SAMPLES, rate: int = DEFAULT_WAV_RATE
) -> bytes:
    """
    The WAV file that the reference TTS producer sends for ``text``: mono,
    16-bit, ``rate`` Hz, ``n_samples`` samples from :func:`reference_samples`.
    """
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(reference_samples(text, n_samples))
    return buf.getvalue()


def verify_wav(text: str, wav_bytes: bytes) -> bool:
    """
    Whether ``wav_bytes`` is a valid WAV file and exactly what the reference
    producer derives for ``text`` (at the sample count and rate it declares).
    """
    try:
        with wave.open(io.BytesIO(wav_bytes), "rb") as w:
            n, rate = w.getnframes(), w.getframerate()
    except (wave.Error, EOFError):
        return False
    return wav_bytes == reference_wav(text, n, rate)


def stt_transcript(audio: bytes) -> str:
    """
    The text the reference STT producer answers for ``audio``.
    """
    return "sha256:" + hashlib.sha256(audio).hexdigest()


# --- the connection -------------------------------------------------------


class Connection:
    """
    One PVX/2 connection to a farm, on a socket with timeouts.

    Frames are read and written whole; every ``PING`` that arrives on an
    active connection is answered with ``PONG`` (section 7), at the next frame
    boundary of what this side writes. While it writes, the connection keeps
    reading (section 10) and holds the frames that arrive for later.
    """

    def __init__(self, timeout: float | None = 30.0) -> None:
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.active = False
        self.okay: dict[str, Any] | None = None
        self.max_frame = DEFAULT_MAX_FRAME
        self.max_job_bytes = DEFAULT_MAX_JOB_BYTES
        self.role: str | None = None
        self.service: str | None = None
        self._rx = bytearray()
        self._header: tuple[str, int] | None = None
        self._pending: collections.deque[tuple[str, Any]] = collections.deque()
        self._pongs_owed = 0
        self._writing = False
        self._eof = False

    # context manager

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # deadlines

    def _deadline(self, timeout: float | None) -> float | None:
        if timeout is None:
            return None
        return time.monotonic() + timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionClosed("timed out waiting for the farm")
        return left

    # setup

    def connect(self, host: str, port: int) -> None:
        """
        Open the TCP connection and read the 3-byte greeting (section 2.1).
        """
        deadline = self._deadline(self.timeout)
        try:
            self.sock = socket.create_connection((host, port), timeout=self.timeout)
        except OSError as e:
            raise ConnectionClosed(f"cannot connect to {host}:{port}: {e}") from None
        self.sock.settimeout(self.timeout)
        while len(self._rx) < len(GREETING):
            self._read_some(deadline)
        greeting = bytes(self._rx[: len(GREETING)])
        del self._rx[: len(GREETING)]
        if greeting != GREETING:
            self.close()
            raise ProtocolError(f"bad greeting {greeting!r}, expected {GREETING!r}")

    def hello(
        self,
        role: str,
        service: str,
        key: str = "",
        models: list[str] | None = None,
        languages: list[str] | None = None,
    ) -> dict[str, Any]:
        """
        Send ``HELO`` and wait for ``OKAY`` (returned) or ``DENY`` (raised as
        :class:`Denied`). Nothing else is sent before the answer (section 2.3).
        """
        fields: dict[str, Any] = {"protocol": 2, "role": role, "service": service, "key": key}
        if role == "producer":
            fields["models"] = list(models if models is not None else ["*"])
            if languages is not None:
                fields["languages"] = list(languages)
        self.send_frame("HELO", fields)
        verb, payload = self.recv_frame()
        if verb == "DENY":
            self.close()
            raise Denied(payload.get("error"), payload.get("message"))
        if verb == "FAIL":
            self.close()
            raise FarmFailure(payload.get("error"), payload.get("message"))
        if verb != "OKAY":
            self.close()
            raise ProtocolError(f"expected OKAY or DENY, got {verb}")
        if payload.get("protocol") != 2:
            raise ProtocolError(f"OKAY for protocol {payload.get('protocol')!r}")
        if not isinstance(payload.get("farm"), str):
            raise ProtocolError("OKAY without a string 'farm'")
        if not _is_number(payload.get("ping_interval")):
            raise ProtocolError("OKAY without a numeric 'ping_interval'")
        for name in ("max_frame", "max_job_bytes"):
            value = payload.get(name)
            if not _is_int(value) or value <= 0:
                raise ProtocolError(f"OKAY without a positive integer {name!r}")
        self.okay = payload
        self.max_frame = payload["max_frame"]
        self.max_job_bytes = payload["max_job_bytes"]
        self.role, self.service = role, service
        self.active = True
        return payload

    def close(self) -> None:
        """
        Close without a frame: stop writing, let the farm see the end of the
        stream, read until it closes too (briefly), then close the socket.
        Draining first avoids a reset that could destroy frames in flight.
        """
        sock, self.sock = self.sock, None
        self.active = False
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2.0)
            while sock.recv(READ_SIZE):
                pass
        except OSError:
            pass
        finally:
            sock.close()

    # low-level input/output

    def _read_some(self, deadline: float | None) -> None:
        """
        Block (until ``deadline``) for some bytes and append them to the buffer.
        """
        if self.sock is None:
            raise ConnectionClosed("connection is closed")
        if self._eof:
            raise ConnectionClosed("the farm closed the connection")
        self.sock.settimeout(self._remaining(deadline))
        try:
            data = self.sock.recv(READ_SIZE)
        except socket.timeout:
            raise ConnectionClosed("timed out waiting for the farm") from None
        except OSError as e:
            raise ConnectionClosed(f"connection lost: {e}") from None
        if not data:
            self._eof = True
            raise ConnectionClosed("the farm closed the connection")
        self._rx += data

    def _write(self, data: bytes, deadline: float | None) -> None:
        """
        Write all of ``data``, reading whatever arrives meanwhile into the
        buffer so that the farm is never blocked by us (section 10).
        """
        if self.sock is None:
            raise ConnectionClosed("connection is closed")
        view = memoryview(data)
        self._writing = True
        try:
            while view:
                readers = [] if self._eof else [self.sock]
                r, w, _ = select.select(readers, [self.sock], [], self._remaining(deadline))
                if not r and not w:
                    continue  # _remaining raises once the deadline has passed
                if r:
                    try:
                        chunk: bytes | None = self.sock.recv(READ_SIZE)
                    except BlockingIOError:
                        chunk = None  # a spurious wake-up
                    if chunk == b"":
                        self._eof = True
                    elif chunk:
                        self._rx += chunk
                        self._parse_frames()
                if w:
                    self.sock.settimeout(0)
                    try:
                        sent = self.sock.send(view)
                    except BlockingIOError:
                        sent = 0
                    view = view[sent:]
        except OSError as e:
            raise ConnectionClosed(f"connection lost while writing: {e}{self._why()}") from None
        finally:
            self._writing = False
            if self.sock is not None:
                self.sock.settimeout(self.timeout)

    def _why(self) -> str:
        for verb, payload in self._pending:
            if verb in ("FAIL", "DENY"):
                return f" (farm said {verb} {payload.get('error')}: {payload.get('message')})"
        return ""

    def _parse_frames(self) -> None:
        """
        Move every complete frame from the input buffer to the pending queue,
        checking each header as soon as its 12 bytes are there. ``PING`` is
        counted for an answer, ``PONG`` is dropped.
        """
        while True:
            if self._header is None:
                if len(self._rx) < HEADER_SIZE:
                    return
                limit = self.max_frame if self.active else DEFAULT_MAX_FRAME
                self._header = check_header(bytes(self._rx[:HEADER_SIZE]), limit)
            verb, length = self._header
            if len(self._rx) < HEADER_SIZE + length:
                return
            raw = bytes(self._rx[HEADER_SIZE : HEADER_SIZE + length])
            del self._rx[: HEADER_SIZE + length]
            self._header = None
            if verb == "PING":
                if not self.active:
                    raise ProtocolError("PING before OKAY")
                self._pongs_owed += 1
                continue
            if verb == "PONG":
                continue
            if verb == "DATA":
                if not raw:
                    raise ProtocolError("empty DATA frame")
                self._pending.append((verb, raw))
            else:
                self._pending.append((verb, decode_json(raw)))

    def _flush_pongs(self) -> None:
        while self._pongs_owed and not self._writing:
            self._pongs_owed -= 1
            self._write(encode_frame("PONG"), self._deadline(self.timeout))
            # a PONG is a whole frame: answer PINGs that arrived meanwhile too

    def poll(self) -> None:
        """
        Read, without waiting, whatever has already arrived.
        """
        if self.sock is None or self._eof:
            return
        while True:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                break
            try:
                chunk = self.sock.recv(READ_SIZE)
            except OSError:
                break
            if not chunk:
                self._eof = True
                break
            self._rx += chunk
        self._parse_frames()
        self._flush_pongs()

    # frames

    def send_frame(self, verb: str, payload: dict[str, Any] | bytes | None = None) -> None:
        """
        Send one frame: a dict is encoded as JSON, bytes are sent raw, None is
        an empty payload. Refuses payloads over ``max_frame`` (section 2.4).
        """
        if isinstance(payload, dict):
            raw = encode_json(payload)
        elif payload is None:
            raw = b""
        else:
            raw = bytes(payload)
        if len(raw) > self.max_frame:
            raise ValueError(f"{verb} payload of {len(raw)} bytes exceeds max_frame {self.max_frame}")
        self._write(encode_frame(verb, raw), self._deadline(self.timeout))
        self._flush_pongs()

    def recv_frame(self, timeout: float | None | type = ...) -> tuple[str, Any]:
        """
        The next frame other than ``PING``/``PONG`` (``PING`` is answered):
        ``(verb, dict)`` for control verbs, ``(verb, bytes)`` for ``DATA``.
        ``timeout`` defaults to the connection's; ``None`` waits for ever.
        """
        deadline = self._deadline(self.timeout if timeout is ... else timeout)
        while True:
            self._parse_frames()
            self._flush_pongs()
            if self._pending:
                return self._pending.popleft()
            try:
                self._read_some(deadline)
            except ConnectionClosed as e:
                raise ConnectionClosed(f"{e}{self._why()}") from None

    def _connection_fail(self, payload: dict[str, Any]) -> PvxError:
        """
        The error for a FAIL with "id": null that ends the connection.
        """
        self.close()
        code = payload.get("error")
        if code == "protocol":
            return ProtocolError(f"the farm reports a protocol error: {payload.get('message')}")
        return FarmFailure(code, payload.get("message"))

    # consumer

    def job(
        self, request: dict[str, Any], upload: bytes = b"", timeout: float | None | type = ...
    ) -> tuple[dict[str, Any], bytes]:
        """
        Run one job as a consumer (section 5): send ``JOB_``, wait for
        ``ASGN``, upload, and return the ``RSLT`` fields and the result bytes.
        Raises :class:`JobFailed` on a ``FAIL`` for the job or its refusal.
        """
        if not self.active or self.role != "consumer":
            raise PvxError("not an active consumer connection")
        if len(upload) != request.get("size", 0):
            raise ValueError("upload length differs from the request's size")
        if len(upload) > self.max_job_bytes:
            raise ValueError(f"upload exceeds max_job_bytes {self.max_job_bytes}")
        job_timeout = self.timeout if timeout is ... else timeout
        self.send_frame("JOB_", request)

        # 5.2: ASGN, or FAIL with "id": null refusing the job
        while True:
            verb, payload = self.recv_frame(job_timeout)
            if verb == "ASGN":
                job_id = payload.get("id")
                if not isinstance(job_id, str):
                    raise ProtocolError("ASGN without a string id")
                break
            if verb == "FAIL":
                if payload.get("id") is None and payload.get("error") != "protocol":
                    raise JobFailed(payload.get("error"), payload.get("message"), None)
                raise self._connection_fail(payload)
            raise ProtocolError(f"unexpected {verb} while waiting for ASGN")

        # 5.3: every announced byte is sent, whatever arrives meanwhile
        for offset in range(0, len(upload), self.max_frame):
            self.send_frame("DATA", upload[offset : offset + self.max_frame])

        # 5.4: RSLT (plus "size" bytes of DATA), or FAIL with the job id
        fields: dict[str, Any] | None = None
        data = bytearray()
        owed = 0
        while True:
            verb, payload = self.recv_frame(job_timeout)
            if verb == "FAIL":
                fail_id = payload.get("id")
                if fail_id == job_id:
                    raise JobFailed(payload.get("error"), payload.get("message"), job_id)
                if fail_id is None:
                    raise self._connection_fail(payload)
                raise ProtocolError(f"FAIL for a foreign job id {fail_id!r}")
            if verb == "RSLT" and fields is None:
                if payload.get("id") != job_id:
                    raise ProtocolError(f"RSLT for a foreign job id {payload.get('id')!r}")
                size = payload.get("size", 0)
                if not _is_int(size) or size < 0:
                    raise ProtocolError(f"RSLT with a bad size {size!r}")
                fields, owed = payload, size
                if owed == 0:
                    return fields, b""
            elif verb == "DATA" and fields is not None and owed > 0:
                if len(payload) > owed:
                    raise ProtocolError("more DATA than the RSLT announced")
                data += payload
                owed -= len(payload)
                if owed == 0:
                    return fields, bytes(data)
            else:
                raise ProtocolError(f"unexpected {verb} during job {job_id}")

    def stt(
        self,
        model: str,
        audio: bytes,
        language: str | None = None,
        fmt: str = "auto",
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """
        Transcribe ``audio``; returns the ``RSLT`` fields (``id``, ``text``, ...).
        """
        if not audio:
            raise ValueError("an STT job needs at least one byte of audio")
        request: dict[str, Any] = {"model": model, "format": fmt, "size": len(audio)}
        if language is not None:
            request["language"] = language
        if timeout_s is not None:
            request["timeout_s"] = timeout_s
        fields, _ = self.job(request, audio)
        return fields

    def tts(
        self,
        model: str,
        text: str,
        voice: str | None = None,
        language: str | None = None,
        timeout_s: float | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """
        Synthesise ``text``; returns the ``RSLT`` fields and the audio bytes.
        """
        request: dict[str, Any] = {"model": model, "text": text, "size": 0}
        if voice is not None:
            request["voice"] = voice
        if language is not None:
            request["language"] = language
        if timeout_s is not None:
            request["timeout_s"] = timeout_s
        return self.job(request)

    # producer

    def _take_cancel(self, job_id: str) -> bool:
        """
        Whether a CNCL for ``job_id`` has already arrived (it is consumed).
        """
        self.poll()
        for frame in list(self._pending):
            verb, payload = frame
            if verb == "CNCL" and payload.get("id") == job_id:
                self._pending.remove(frame)
                return True
        return False

    def serve(
        self,
        n_jobs: int | None = None,
        wav_samples: int = DEFAULT_WAV_SAMPLES,
        log: Any = None,
    ) -> int:
        """
        Run jobs as the reference producer (section 6) until ``n_jobs`` have
        been answered (for ever when None). Returns the number answered.
        """
        if not self.active or self.role != "producer":
            raise PvxError("not an active producer connection")
        answered = 0
        while n_jobs is None or answered < n_jobs:
            verb, payload = self.recv_frame(None)  # idle: PINGs are answered meanwhile
            if verb == "JOB_":
                outcome = self._serve_job(payload, wav_samples)
                answered += 1
                if log is not None:
                    names = ",".join(sorted(payload))
                    log(f"job {payload.get('id')} {self.service} fields={names} {outcome}")
            elif verb == "CNCL":
                continue  # 6.3: crossed our answer on the wire; ignore
            elif verb == "FAIL" and payload.get("id") is None:
                raise self._connection_fail(payload)
            else:
                raise ProtocolError(f"unexpected {verb} while idle")
        return answered

    def _serve_job(self, job: dict[str, Any], wav_samples: int) -> str:
        job_id = job.get("id")
        size = job.get("size")
        if not isinstance(job_id, str):
            raise ProtocolError("JOB_ without a string id")
        if not _is_int(size) or size < 0:
            raise ProtocolError(f"JOB_ with a bad size {size!r}")
        timeout_s = job.get("timeout_s")
        # the farm CNCLs or drops us when the job runs out; wait a little longer
        deadline_s = timeout_s + 30.0 if _is_number(timeout_s) else None

        digest = hashlib.sha256()
        received = 0
        while received < size:
            verb, payload = self.recv_frame(deadline_s)
            if verb == "DATA":
                received += len(payload)
                if received > size:
                    raise ProtocolError("more DATA than the JOB_ announced")
                digest.update(payload)
            elif verb == "CNCL":
                if payload.get("id") == job_id:
                    return self._cancelled(job_id)
            elif verb == "FAIL" and payload.get("id") is None:
                raise self._connection_fail(payload)
            else:
                raise ProtocolError(f"unexpected {verb} during job {job_id}")

        if self._take_cancel(job_id):
            return self._cancelled(job_id)
        if self.service == "stt":
            self.send_frame("RSLT", {"id": job_id, "text": "sha256:" + digest.hexdigest()})
            return f"ok size={size}"
        text = job.get("text")
        if not isinstance(text, str):
            self.send_frame(
                "FAIL", {"id": job_id, "error": "engine_error", "message": "no text to speak"}
            )
            return "failed"
        wav = reference_wav(text, wav_samples)
        if len(wav) > self.max_job_bytes:
            self.send_frame(
                "FAIL", {"id": job_id, "error": "engine_error", "message": "result too large"}
            )
            return "failed"
        self.send_frame("RSLT", {"id": job_id, "content_type": "audio/wav", "size": len(wav)})
        for offset in range(0, len(wav), self.max_frame):
            self.send_frame("DATA", wav[offset : offset + self.max_frame])
        return f"ok size={len(wav)}"

    def _cancelled(self, job_id: str) -> str:
        self.send_frame("FAIL", {"id": job_id, "error": "cancelled", "message": "cancelled"})
        return "cancelled"


def open_connection(
    host: str,
    port: int,
    role: str,
    service: str,
    key: str = "",
    models: list[str] | None = None,
    languages: list[str] | None = None,
    timeout: float | None = 30.0,
) -> Connection:
    """
    Connect, read the greeting, and complete the handshake.
    """
    conn = Connection(timeout)
    try:
        conn.connect(host, port)
        conn.hello(role, service, key, models, languages)
    except BaseException:
        conn.close()
        raise
    return conn


# --- command line ---------------------------------------------------------


def _print(line: str) -> None:
    print(line, flush=True)


def _cmd_consumer_stt(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as f:
        audio = f.read()
    with open_connection(
        args.host, args.port, "consumer", "stt", args.key, timeout=args.timeout
    ) as conn:
        fields = conn.stt(args.model, audio, args.language, args.format, args.timeout_s)
    _print(json.dumps(fields, ensure_ascii=False, sort_keys=True))
    return 0


def _cmd_consumer_tts(args: argparse.Namespace) -> int:
    with open_connection(
        args.host, args.port, "consumer", "tts", args.key, timeout=args.timeout
    ) as conn:
        fields, audio = conn.tts(args.model, args.text, args.voice, args.language, args.timeout_s)
    if args.output:
        with open(args.output, "wb") as f:
            f.write(audio)
    report = dict(fields)
    report["received_bytes"] = len(audio)
    if args.verify:
        report["verified"] = verify_wav(args.text, audio)
    _print(json.dumps(report, ensure_ascii=False, sort_keys=True))
    if args.verify and not report["verified"]:
        print("pvx2_reference: the WAV is not the reference producer's", file=sys.stderr)
        return 1
    return 0


def _cmd_producer(args: argparse.Namespace) -> int:
    models = [m for m in args.models.split(",") if m]
    languages = [lang for lang in args.languages.split(",") if lang] if args.languages else None
    with open_connection(
        args.host,
        args.port,
        "producer",
        args.service,
        args.key,
        models=models,
        languages=languages,
        timeout=args.timeout,
    ) as conn:
        _print(f"joined {args.service} farm={conn.okay['farm']} max_frame={conn.max_frame}")
        answered = conn.serve(args.jobs, args.wav_samples, log=_print)
    _print(f"done jobs={answered}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvx2_reference", description="A reference PVX/2 consumer and producer."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--key", default="", help="key sent in HELO (default empty)")
        p.add_argument(
            "--timeout", type=float, default=90.0, help="seconds to wait for the farm (default 90)"
        )

    stt = sub.add_parser("consumer-stt", help="transcribe an audio file")
    common(stt)
    stt.add_argument("file")
    stt.add_argument("--model", required=True)
    stt.add_argument("--language")
    stt.add_argument("--format", default="auto", choices=["auto", "wav", "pcm_s16le", "zip"])
    stt.add_argument("--timeout-s", type=float, help="job timeout_s sent in JOB_")
    stt.set_defaults(func=_cmd_consumer_stt)

    tts = sub.add_parser("consumer-tts", help="synthesise a text")
    common(tts)
    tts.add_argument("text")
    tts.add_argument("--model", required=True)
    tts.add_argument("--voice")
    tts.add_argument("--language")
    tts.add_argument("-o", "--output", help="write the audio to this file")
    tts.add_argument(
        "--verify", action="store_true", help="check the WAV is the reference producer's"
    )
    tts.add_argument("--timeout-s", type=float, help="job timeout_s sent in JOB_")
    tts.set_defaults(func=_cmd_consumer_tts)

    prod = sub.add_parser("producer", help="serve jobs as the reference producer")
    common(prod)
    prod.add_argument("--service", required=True, choices=["stt", "tts"])
    prod.add_argument("--jobs", type=int, help="exit after answering this many jobs")
    prod.add_argument("--models", default="*", help="comma-separated models (default *)")
    prod.add_argument("--languages", help="comma-separated languages (default: any)")
    prod.add_argument(
        "--wav-samples",
        type=int,
        default=DEFAULT_WAV_SAMPLES,
        help=f"samples per TTS result (default {DEFAULT_WAV_SAMPLES})",
    )
    prod.set_defaults(func=_cmd_producer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JobFailed as e:
        print(f"pvx2_reference: {e}", file=sys.stderr)
        return 1
    except Denied as e:
        print(f"pvx2_reference: {e}", file=sys.stderr)
        return 3
    except (PvxError, OSError, ValueError) as e:
        print(f"pvx2_reference: {type(e).__name__}: {e}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
