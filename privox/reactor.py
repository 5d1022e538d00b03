"""
The reactor the daemons run on: Twisted's epoll reactor, with the common
event, a socket ready to read and nothing else, handed straight to its
connection (C{twistd --reactor privox}, the plugin in
C{twisted/plugins/privox_reactor.py}).

For every event, Twisted's epoll reactor calls the descriptor through
C{log.callWithLogger} (a legacy log context, the descriptor's prefix as
C{system}: a dict copied, pushed and popped) and C{_doReadOrWrite} (which
sorts out hang-ups, errors and writes): about 5 us of Python per read on
top of the read itself, what a whole turn of asyncio's loop costs. A farm
reads two or three times per relayed job (bench/README.rst, "Against a
compact asyncio farm"). Here a plain read calls C{doRead} and nothing
else; everything else (hang-ups, errors, writability) takes Twisted's own
path. What a read raises, and the closing that follows it (a peer's FIN
is a plain read of nothing), are logged in the descriptor's context as
Twisted logs them. The difference: lines of Twisted's legacy log API
written during a plain read that did not fail (none of the daemons' own,
which use C{twisted.logger}) carry no C{system} prefix.
"""

from __future__ import annotations

from select import EPOLLIN
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.python import failure, log


class EPollReactor(epollreactor.EPollReactor):
    """
    C{epollreactor.EPollReactor}, reads dispatched without a log context.
    """

    def doPoll(self, timeout: float | None) -> None:
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except InterruptedError:
            return
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this poll
            if event != EPOLLIN:
                log.callWithLogger(selectable, self._doReadOrWrite, selectable, fd, event)
                continue
            try:
                # As Twisted checks it: a descriptor closed under us.
                why = _NO_FILEDESC if selectable.fileno() == -1 else selectable.doRead()
            except BaseException:
                why = self._logged(selectable, failure.Failure())
            if why:
                # Rare (a close, an error): in the context, and guarded, as
                # Twisted's own path runs it.
                log.callWithLogger(selectable, self._disconnectSelectable, selectable, why, True)

    doIteration = doPoll

    @staticmethod
    def _logged(selectable: Any, reason: failure.Failure) -> BaseException:
        # As Twisted's reactor logs it: in the descriptor's context.
        log.callWithLogger(selectable, log.err, reason)
        return reason.value


def install() -> None:
    """
    Install L{EPollReactor} as the global reactor (as C{twistd --reactor
    privox} does).
    """
    installReactor(EPollReactor())
