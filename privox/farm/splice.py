"""
Relaying bulk DATA inside the kernel.

The farm never looks at the bytes of an upload (consumer to producer) or of
a result (producer to consumer); it only re-frames them. On Linux, with both
peers on plain TCP, it need not copy them through its own memory at all:
splice(2) moves them from one peer's socket into a pipe and from the pipe
into the other peer's socket. Only the 12-byte DATA headers pass through
Python.

A L{SpliceRelay} takes over one direction of one job: an upload from its
first DATA frame on, once the job is assigned, when at least C{splice_min}
bytes of it are owed; a result once one of its frames has that much still
to come. It goes on, frame after frame, while the job still forwards that
direction's bytes to the same peer:

  - It holds the source connection's reading (Twisted's transport reads
    nothing meanwhile) and reads the source through a duplicate of its
    socket: each next frame's header with an ordinary read, fed to the
    connection's own decoder, so every check (verbs, sizes, max_frame,
    what the job announced) is the one the ordinary path makes; each
    payload with splice(2).
  - It announces only bytes the source has already received (FIONREAD):
    a header for them goes into the pipe, then they follow. So the sink's
    stream is mid-frame only while the pipe drains, which depends on the
    sink alone; a CNCL or a FAIL for the sink waits at most for that
    (L{privox.farm.connection.FarmConnection.write} queues it), never for
    a stalled source.
  - It starts only when the sink's own write buffer is empty, and anything
    else written to the sink stops it, so the sink's bytes stay in order.

When it stops (the job moved on, a non-DATA frame, the source closed,
anything written to the sink) the rest goes the ordinary way: the source's
transport reads again and its decoder hands out pieces as before. TLS
connections and other platforms always take the ordinary way.
"""

from __future__ import annotations

import enum
import fcntl
import os
import socket
import sys
import termios
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from privox.framing import HEADER_LEN, encodeHeader

if TYPE_CHECKING:
    from privox.farm.connection import FarmConnection

log = Logger()

#: The pipe each relay moves bytes through: a relay holds at most this much,
#: in the kernel instead of the farm's memory, as much as the ordinary path
#: may buffer (L{privox.farm.connection.RELAY_BUFFER}).
PIPE_SIZE = 512 * 1024

_PAGE = os.sysconf("SC_PAGE_SIZE")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def _newPipe() -> tuple[int, int]:
    return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)


def spliceAvailable() -> bool:
    """
    Whether this platform has splice(2) (Linux, Python 3.10 and later).
    """
    return hasattr(os, "splice") and hasattr(termios, "FIONREAD")


def spliceable(transport: Any) -> bool:
    """
    Whether C{transport} is a plain TCP (or UNIX) socket whose bytes a relay
    may move itself: not TLS, which must decrypt and encrypt them.
    """
    return (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        # What unsent() reads; were a Twisted release to rename them, no relay
        # would start (and tests/test_splice.py would say so).
        and all(hasattr(transport, name) for name in ("dataBuffer", "offset", "_tempDataLen"))
    )


def unsent(transport: Any) -> int:
    """
    Bytes written to C{transport} that it has not handed to its socket yet.
    """
    # Twisted has no public "write buffer is empty"; these FileDescriptor
    # attributes are it (spliceable() made sure this is one).
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def splicerFor(minimum: int, reactor: Any) -> Splicer | None:
    """
    A farm's splicer, or None where relays can't run: turned off
    (C{minimum} 0), no splice(2), or a reactor that can't watch descriptors.
    """
    if minimum and spliceAvailable() and IReactorFDSet.providedBy(reactor):
        return Splicer(reactor, minimum)
    return None


class Splicer:
    """
    Starts relays for a farm's connections, and counts what they moved.

    @ivar minimum: an upload or result that owes at least this many bytes
        when its DATA starts, or a DATA frame with that many still to come,
        gets a relay.
    """

    def __init__(self, reactor: IReactorFDSet, minimum: int, pipeSize: int = PIPE_SIZE) -> None:
        self.reactor = reactor
        self.minimum = minimum
        self.pipeSize = pipeSize
        #: Relays started, and payload bytes they moved.
        self.relays = 0
        self.bytes = 0
        self._failing = False

    def relay(self, source: FarmConnection, sink: FarmConnection) -> SpliceRelay | None:
        """
        Start relaying C{source}'s current DATA to C{sink}; None if the
        system could not give a relay what it needs (then the ordinary way
        goes on).
        """
        try:
            relay = SpliceRelay(self, source, sink)
        except OSError as e:
            # Out of file descriptors or pipe buffers: not an error of the
            # peers, and the ordinary way still works. Say so once per spell.
            if not self._failing:
                log.warn("splice relay unavailable ({why}); relaying through memory", why=e)
            self._failing = True
            return None
        self._failing = False
        self.relays += 1
        relay.start()
        return relay


class _State(enum.Enum):
    SETTLING = "settling"  # the sink's own write buffer is still draining
    FILLING = "filling"  # waiting for the source's bytes
    DRAINING = "draining"  # the pipe's bytes (and their header) going to the sink
    ENDING = "ending"  # draining the last of them: stopped, done once drained
    DONE = "done"


class _Ready:
    """
    What a relay waits on: one of its duplicate descriptors, ready.
    """

    def __init__(self, relay: SpliceRelay, fd: int) -> None:
        self._relay = relay
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def connectionLost(self, reason: Any) -> None:
        # The reactor is shutting down.
        self._relay.abandon()

    def logPrefix(self) -> str:
        return "SpliceRelay"


@implementer(IReadDescriptor)
class _SourceReady(_Ready):
    def doRead(self) -> None:
        self._relay._pump()


@implementer(IWriteDescriptor)
class _SinkReady(_Ready):
    def doWrite(self) -> None:
        self._relay._pump()


class SpliceRelay:
    """
    One direction of one job, moved by splice(2): see the module docstring.
    """

    def __init__(self, splicer: Splicer, source: FarmConnection, sink: FarmConnection) -> None:
        self._splicer = splicer
        self._reactor = splicer.reactor
        self._source = source
        self._sink = sink
        self._state = _State.SETTLING
        #: Bytes in the pipe (a header and payload), and payload bytes
        #: announced by that header that are still to come from the source.
        self._inPipe = 0
        self._owed = 0
        self._available = bytearray(4)
        #: Whether the reactor watches the source's and the sink's sockets
        #: for the relay.
        self._reading = self._writing = False
        # Duplicates: the relay waits on these descriptors without touching
        # how Twisted watches the originals.
        self._in: socket.socket | None = None
        self._out: socket.socket | None = None
        self._pipe: tuple[int, int] | None = None
        try:
            self._in = socket.socket(fileno=os.dup(source.transport.fileno()))
            self._out = socket.socket(fileno=os.dup(sink.transport.fileno()))
            self._pipe = _newPipe()
        except OSError:
            self._close()
            raise
        try:
            fcntl.fcntl(self._pipe[1], _F_SETPIPE_SZ, splicer.pipeSize)
        except OSError:
            pass  # over the user's pipe quota (pipe-user-pages-soft)
        self._capacity = fcntl.fcntl(self._pipe[1], _F_GETPIPE_SZ)
        if self._capacity < splicer.pipeSize:
            # A page or two at a time would cost more than going through
            # memory.
            self._close()
            raise OSError(f"the kernel gave a pipe of {self._capacity} bytes only")
        self._reader = _SourceReady(self, self._in.fileno())
        self._writer = _SinkReady(self, self._out.fileno())
        #: What the farm wrote to the sink while the pipe drained, in order;
        #: None for "then close it".
        self._later: list[bytes | None] = []

    def __repr__(self) -> str:
        return f"<SpliceRelay {self._state.value}>"

    def start(self) -> None:
        self._source.holdReading(self)
        self._source.relayIn = self
        self._sink.relayOut = self
        self._pump()

    def stop(self) -> None:
        """
        Move no more: end now, or once the frame in the pipe is whole in the
        sink.
        """
        state = self._state
        if state is _State.DRAINING:
            self._state = _State.ENDING
            if not self._owed:
                # Nothing more to read: let go of the source's socket now,
                # so closing it closes it.
                self._closeSource()
        elif state is _State.SETTLING or state is _State.FILLING:
            self._finish()

    def later(self, data: bytes | None) -> None:
        """
        Write C{data} to the sink once the pipe has drained (None: close the
        sink then).
        """
        self._later.append(data)

    def abandon(self) -> None:
        """
        End now, dropping what is in the pipe: the sink is gone.
        """
        if self._state is not _State.DONE:
            self._finish()

    # The pump: runs until it has to wait for the source or the sink.

    def _pump(self) -> None:
        while True:
            state = self._state
            if state is _State.SETTLING:
                if unsent(self._sink.transport):
                    return self._wait(write=True)
                self._state = _State.FILLING
            elif state is _State.FILLING:
                if not self._fill():
                    return
            elif state is _State.DRAINING or state is _State.ENDING:
                if not self._drain():
                    return
            else:
                return

    def _wait(self, read: bool = False, write: bool = False) -> None:
        if read != self._reading:
            self._reading = read
            (self._reactor.addReader if read else self._reactor.removeReader)(self._reader)
        if write != self._writing:
            self._writing = write
            (self._reactor.addWriter if write else self._reactor.removeWriter)(self._writer)

    def _fill(self) -> bool:
        """
        Start the next chunk: a header for the bytes the source has of its
        current frame, into the pipe, and then those bytes. False to wait
        for the source (or when done).
        """
        source = self._source
        due = source.relayDue(self._sink)
        if due is None:
            self._finish()
            return False
        assert self._in is not None and self._pipe is not None
        try:
            if due == 0:
                # Between frames: the next header goes through the decoder.
                data = self._in.recv(source.headerWanted())
                if not data:
                    self._finish()  # the source's transport will read the end
                    return False
                source.relayReceived(data)
                return self._state is _State.FILLING
            fcntl.ioctl(self._in.fileno(), termios.FIONREAD, self._available)
            available = int.from_bytes(self._available, sys.byteorder)
            if not available:
                # Nothing yet, or the end: a peek tells which.
                if not self._in.recv(1, socket.MSG_PEEK):
                    self._finish()
                    return False
                return True
        except BlockingIOError:
            self._wait(read=True)
            return False
        except OSError:
            self._finish()  # the source failed: its own transport will find out
            return False
        # Announce only bytes the source already has, so the sink's frame is
        # never left waiting on the source.
        # The header takes a page of the pipe of its own.
        n = min(due, available, self._capacity - _PAGE)
        os.write(self._pipe[1], encodeHeader(b"DATA", n))
        self._inPipe = HEADER_LEN
        self._owed = n
        # Draining before the accounting below: that may end the job, and
        # whatever it writes to the sink must wait for this frame.
        self._state = _State.DRAINING
        self._splicer.bytes += n
        source.relayTaken(n)
        return True

    def _drain(self) -> bool:
        """
        Move the announced bytes from the source into the pipe and the pipe's
        bytes into the sink; False to wait for either (or when done).
        """
        assert self._out is not None and self._pipe is not None
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        moved = False
        if self._owed:
            assert self._in is not None
            try:
                n = os.splice(self._in.fileno(), self._pipe[1], self._owed, flags=flags)
            except BlockingIOError:
                n = -1  # the pipe is full (drained below), or the source is slow
            except OSError:
                n = 0
            if n == 0:
                # The source's bytes the header announced are gone (a reset
                # discards them): the sink's stream can't be made whole.
                return self._sinkBroken("its peer vanished mid-frame")
            if n > 0:
                self._owed -= n
                self._inPipe += n
                moved = True
                if self._state is _State.ENDING and not self._owed:
                    self._closeSource()
        if self._inPipe:
            try:
                n = os.splice(self._pipe[0], self._out.fileno(), self._inPipe, flags=flags)
            except BlockingIOError:
                n = -1
            except OSError as e:
                return self._sinkBroken(str(e))
            if n == 0:
                return self._sinkBroken("its socket took nothing")
            if n > 0:
                self._inPipe -= n
                moved = True
        if self._owed or self._inPipe:
            if not moved:
                # With bytes in the pipe it is the sink that is full;
                # with none, the source has not sent the rest yet.
                self._wait(read=not self._inPipe, write=bool(self._inPipe))
                return False
            return True
        if self._state is _State.ENDING:
            self._finish()
            return False
        self._state = _State.FILLING
        return True

    # Ending

    def _sinkBroken(self, why: str) -> bool:
        log.info("dropping a peer whose stream broke mid-relay: {why}", why=why)
        sink = self._sink
        self._finish()
        sink.abort()
        return False

    def _finish(self) -> None:
        self._state = _State.DONE
        self._wait()
        self._close()
        source, sink = self._source, self._sink
        if source.relayIn is self:
            source.relayIn = None
        if sink.relayOut is self:
            sink.relayOut = None
        later, self._later = self._later, []
        for data in later:
            if data is None:
                sink.transport.loseConnection()
            else:
                sink.transport.write(data)
        source.releaseReading(self)

    def _closeSource(self) -> None:
        if self._reading:
            self._wait(write=self._writing)
        if self._in is not None:
            self._in.close()
            self._in = None

    def _close(self) -> None:
        self._closeSource()
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
