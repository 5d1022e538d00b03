"""
privox.reactor: Twisted's epoll reactor with plain reads handed straight to
their connections. Real TCP sockets on a reactor of its own (not the one
trial runs), driven a turn at a time; what it does beyond a plain read is
Twisted's own path, and each case here is one a connection meets.
"""

from __future__ import annotations

from select import EPOLLIN, EPOLLOUT
from typing import Any, Callable

from twisted.internet import error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python import log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from privox.reactor import EPollReactor


class Recorder(Protocol):
    """
    Keeps what it reads and how it ended; C{onData} runs on each read.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None
        self.onData: Callable[[bytes], None] = lambda data: None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.onData(data)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self.lost = reason


class FailingClose(Recorder):
    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        super().connectionLost(reason)
        raise ZeroDivisionError("a bug in connectionLost")


class Batches:
    """
    An epoll object that keeps which descriptors each poll found ready.
    """

    def __init__(self, poller: Any) -> None:
        self._poller = poller
        self.seen: list[set[int]] = []

    def poll(self, *args: Any) -> list[tuple[int, int]]:
        events = self._poller.poll(*args)
        self.seen.append({fd for fd, _ in events})
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.readClosed = False

    def readConnectionLost(self) -> None:
        self.readClosed = True
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class ReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.closeReactor)

    def closeReactor(self) -> None:
        # Ports stop listening on the next turn.
        self.reactor.runUntilCurrent()
        for selectable in self.reactor.removeAll():
            selectable.connectionLost(Failure(error.ConnectionDone()))
        for call in self.reactor.getDelayedCalls():
            call.cancel()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def spin(self, done: Callable[[], bool]) -> None:
        for _ in range(2000):
            if done():
                return
            self.reactor.iterate(0.01)
        self.fail("the reactor never got there")

    def connected(self, serverProtocol: Callable[[], Protocol]) -> tuple[Recorder, Any]:
        """
        A client L{Recorder} connected to a listener making
        C{serverProtocol}s; returns it and the server's protocol.
        """
        servers: list[Protocol] = []

        def make() -> Protocol:
            servers.append(serverProtocol())
            return servers[-1]

        port = self.reactor.listenTCP(0, Factory.forProtocol(make), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = Recorder()
        self.reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(lambda: client))
        self.spin(lambda: bool(servers) and client.transport is not None and client.connected)
        self.spin(lambda: servers[0].transport is not None and servers[0].connected)
        return client, servers[0]

    def test_readsAndWrites(self) -> None:
        """
        Bytes flow both ways, a large write that fills the socket's buffer
        (writability: Twisted's path) included.
        """
        client, server = self.connected(Recorder)
        server.onData = lambda data: server.transport.write(data.upper())
        slowPath: list[int] = []
        callWithLogger = log.callWithLogger

        def recording(selectable: Any, f: Any, *args: Any) -> Any:
            if f == self.reactor._doReadOrWrite:
                slowPath.append(args[-1])
            return callWithLogger(selectable, f, *args)

        self.patch(log, "callWithLogger", recording)
        client.transport.write(b"hello")
        self.spin(lambda: client.received == b"HELLO")
        # The reads came straight; only the client's write took the long way.
        self.assertNotIn(EPOLLIN, slowPath)
        self.assertIn(EPOLLOUT, slowPath)
        big = b"x" * (8 * 1024 * 1024)
        server.transport.write(big)
        self.spin(lambda: len(client.received) == 5 + len(big))
        self.assertEqual(client.received, b"HELLO" + big)

    def test_peerCloses(self) -> None:
        """
        A peer that closes ends the connection as done, not lost.
        """
        client, server = self.connected(Recorder)
        client.transport.write(b"last words")
        client.transport.loseConnection()
        self.spin(lambda: server.lost is not None)
        self.assertEqual(server.received, b"last words")
        server.lost.trap(error.ConnectionDone)

    def test_halfClose(self) -> None:
        """
        A half-closing protocol hears that its peer stopped writing and may
        still answer.
        """
        client, server = self.connected(HalfCloser)
        client.transport.write(b"question")
        client.transport.loseWriteConnection()
        self.spin(lambda: client.lost is not None)
        self.assertTrue(server.readClosed)
        self.assertEqual(server.received, b"question")
        self.assertEqual(client.received, b"bye")

    def test_failingRead(self) -> None:
        """
        An exception from C{dataReceived} is logged as Twisted logs it (in
        the connection's log context) and drops that connection; others go
        on.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client, server = self.connected(Recorder)
        other, otherServer = self.connected(Recorder)

        def fail(data: bytes) -> None:
            raise ZeroDivisionError("a bug")

        server.onData = fail
        client.transport.write(b"boom")
        other.transport.write(b"fine")
        self.spin(lambda: server.lost is not None and otherServer.received == b"fine")
        self.spin(lambda: client.lost is not None)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        [logged] = [e for e in events if e.get("failure") is not None]
        self.assertIn("Recorder", logged["system"])
        server.lost.trap(ZeroDivisionError)
        self.assertIsNone(otherServer.lost)

    def test_failingClose(self) -> None:
        """
        A peer's close (a read of nothing) whose C{connectionLost} raises is
        logged in the connection's context, and the reactor goes on.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client, server = self.connected(FailingClose)
        other, otherServer = self.connected(Recorder)
        client.transport.loseConnection()
        self.spin(lambda: server.lost is not None)
        other.transport.write(b"still here")
        self.spin(lambda: otherServer.received == b"still here")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        [logged] = [e for e in events if e.get("failure") is not None]
        self.assertIn("FailingClose", logged["system"])

    def test_closedByAnEarlierEvent(self) -> None:
        """
        A connection that an earlier event (of the same poll, when both
        arrive together) closed is not read.
        """
        first, firstServer = self.connected(Recorder)
        second, secondServer = self.connected(Recorder)
        firstServer.onData = lambda data: secondServer.transport.abortConnection()
        secondServer.onData = lambda data: firstServer.transport.abortConnection()
        serverFds = {firstServer.transport.fileno(), secondServer.transport.fileno()}
        batches = Batches(self.reactor._poller)
        self.reactor._poller = batches
        # Sent before the reactor's next turn: both servers read in that one.
        first.transport.socket.send(b"a")
        second.transport.socket.send(b"b")
        self.spin(lambda: first.lost is not None or second.lost is not None)
        self.assertEqual(batches.seen[0], serverFds)
        [(reader, aborted)] = [
            (r, a) for r, a in ((firstServer, secondServer), (secondServer, firstServer))
            if a.lost is not None
        ]
        self.assertEqual((len(reader.received), aborted.received), (1, b""))
        aborted.lost.trap(error.ConnectionAborted)
        self.assertIsNone(reader.lost)


class Gone:
    """
    A descriptor whose socket was closed under it (C{fileno} -1).
    """

    def __init__(self) -> None:
        self.lost: Failure | None = None

    def fileno(self) -> int:
        return -1

    def doRead(self) -> None:
        raise AssertionError("read after its socket closed")

    def logPrefix(self) -> str:
        return "Gone"

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


class ClosedUnderItTests(SynchronousTestCase):
    def test_closedUnderIt(self) -> None:
        """
        A descriptor whose socket is closed is not read: it is told the
        connection went away, as Twisted tells it.
        """
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        gone = Gone()
        reactor._selectables[99] = gone
        reactor._reads.add(99)

        class Ready:
            def poll(self, timeout: float, most: int) -> list[tuple[int, int]]:
                return [(99, EPOLLIN)]

            def unregister(self, fd: int) -> None:
                pass

        real, reactor._poller = reactor._poller, Ready()
        try:
            reactor.doPoll(0)
        finally:
            reactor._poller = real
        assert gone.lost is not None
        gone.lost.trap(error.ConnectionFdescWentAway)
        self.assertNotIn(99, reactor._selectables)


class PluginTests(SynchronousTestCase):
    def test_twistdFindsIt(self) -> None:
        """
        C{twistd --reactor privox} installs L{EPollReactor}.
        """
        from twisted.application.reactors import getReactorTypes

        [found] = [r for r in getReactorTypes() if r.shortName == "privox"]
        self.assertEqual(found.moduleName, "privox.reactor")
