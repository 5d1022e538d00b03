"""
What every Privox daemon does the same way under twistd: listen on its
ports before the reactor runs, and end with one line and a non-zero exit
status when a port cannot be had, a key file cannot be read or a model
cannot be loaded (rather than a traceback and status 0).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class ListenService(Service):
    """
    Listens on the endpoint string C{description} for C{factory} in
    C{privilegedStartService}, so a taken port is known before anything
    else starts. A port that cannot be had ends the daemon with exit
    status 1 after one line naming C{option}, which chooses another.
    """

    def __init__(self, description: str, factory: Any, reactor: Any, option: str) -> None:
        self.description = description
        self.option = option
        self.factory = factory
        self._reactor = reactor
        self.port: Any = None
        # Fires with the listening port.
        self.listening: Deferred[Any] = Deferred()
        self._early: list[Failure] | None = None
        self._asked = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        # Started without twistd's privileged step (as tests do).
        if not self._asked:
            self._listen()

    def _listen(self) -> None:
        self._asked = True
        # A failure while listening now ends the daemon with one line; an
        # endpoint that listens later stops the reactor instead.
        self._early = []
        d = serverFromString(self._reactor, self.description).listen(self.factory)
        d.addCallbacks(self._listened, self._failed)
        early, self._early = self._early, None
        if early:
            self._cannotListen(early[0])

    def _listened(self, port: Any) -> None:
        self.port = port
        self.listening.callback(port)

    def _cannotListen(self, failure: Failure) -> None:
        if not failure.check(CannotListenError):
            failure.raiseException()
        error = failure.value.socketError
        log.critical(
            "cannot listen on {endpoint}: {reason}; stop what uses it or choose "
            "another with {option}",
            endpoint=self.description,
            reason=getattr(error, "strerror", None) or str(error),
            option=self.option,
        )
        raise SystemExit(1)

    def _failed(self, failure: Failure) -> None:
        if self._early is not None:
            self._early.append(failure)
            return
        log.failure("cannot listen on {endpoint}", failure, endpoint=self.description)
        self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.port is None:
            return succeed(None)
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening)


class CannotStart(Service):
    """
    What C{makeService} returns when it finds that the daemon cannot start
    (a key file it cannot read): twistd's logging is not running yet then,
    and an exception would be a traceback. Started, it says C{reason} in
    one line and ends the daemon with exit status 1.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def privilegedStartService(self) -> None:
        self._fail()

    def startService(self) -> None:
        self._fail()

    def _fail(self) -> None:
        log.critical("{reason}", reason=self.reason)
        raise SystemExit(1)


def stopWithStatus(reactor: Any, status: int) -> None:
    """
    Stop the reactor, and once twistd has cleaned up (it always exits 0
    after its reactor stopped), end the process with C{status}.
    """
    atexit.register(_exit, status)
    reactor.stop()


def _exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
