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
else; everything else (hang-ups, errors, writability, a descriptor already
closed) takes Twisted's own path, and so does an exception from C{doRead},
logged in the descriptor's context as Twisted logs it. The Logger events
the daemons emit never carried that context (only the legacy
C{twisted.python.log.msg} reads it), so their logs are unchanged.
"""

from __future__ import annotations

from select import EPOLLIN
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
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
            if event != EPOLLIN or selectable.fileno() == -1:
                log.callWithLogger(selectable, self._doReadOrWrite, selectable, fd, event)
                continue
            try:
                why = selectable.doRead()
            except BaseException:
                why = self._logged(selectable, failure.Failure())
            if why:
                self._disconnectSelectable(selectable, why, True)

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
