"""
Log observers for the daemons, for C{twistd --logger}:

  - C{privox.logs.textStdout}: Twisted's usual text lines, on stdout (what
    the systemd units use: journald keeps them);
  - C{privox.logs.jsonStdout}: every event as one JSON object per line
    (Twisted's C{eventAsJSON}), for journald or a log shipper;
  - C{privox.logs.jsonFile}: the same, appended to C{privox.log.json} in
    the working directory.

A connection a daemon accepts logs without its peer's address:
L{withoutPeerAddress}.

The events carry the same named fields as the text lines (route, status,
model, sizes, milliseconds, key ids); with C{--blur-usage} sizes and times
are rounded in both (L{logFigures}).

All three are L{BufferedLogObserver}s. Twisted's own file observers write
and flush every line where it is logged, on the reactor thread: a farm
logging a line per job made a write system call per job, about a sixth of
its CPU for small jobs (bench/farm_relay.py --farm-log). These format each
event at once but write from a thread of their own, at most every 0.2 s;
warnings and errors are written at once, with everything before them, and
so is everything while the reactor is not running: start-up lines, and the
last lines of a stop (twistd ends a SIGTERM by re-raising it, which skips
C{atexit}).
"""

from __future__ import annotations

import atexit
import io
import math
import os
import sys
import threading
from typing import IO, Any, Callable

from twisted.logger import (
    ILogObserver,
    LogLevel,
    eventAsJSON,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

#: Seconds a line may wait before the background thread writes it.
FLUSH_INTERVAL = 0.2

#: Text waiting beyond this many characters is written at once.
MAX_PENDING = 64 * 1024

_URGENT = frozenset([LogLevel.warn, LogLevel.error, LogLevel.critical])


# Sizes and times in log lines, blurred on request.


def withoutPeerAddress(transport: Any) -> None:
    """
    Twisted logs what a connection's reads raise (an unhandled error, with
    its traceback), and any line of its older log API they cause (on
    L{privox.reactor}: those of a read that fails or closes), with the
    connection's log prefix as the line's system: for an accepted TCP
    connection C{Protocol,7,203.0.113.9}, the peer's address. Called as a
    connection is made, this keeps the protocol and the connection's number
    only. Over TLS the prefix is the TCP connection's, under the wrapper.
    """
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    prefix = getattr(transport, "logstr", None)
    if isinstance(prefix, str) and prefix.count(",") >= 2:
        transport.logstr = prefix.rsplit(",", 1)[0]


def blurBytes(n: int) -> int:
    """
    C{n} to two significant figures (C{123456} -> C{120000}); below 100 it
    is left as it is.
    """
    n = int(n)
    if n < 100:
        return n
    factor = 10 ** (len(str(n)) - 2)
    return int(math.floor(n / factor + 0.5)) * factor


def blurMs(ms: float) -> int:
    """
    Milliseconds rounded to the nearest 100 ms.
    """
    return int(math.floor(ms / 100 + 0.5)) * 100


def logFigures(blur: bool, *, ms: float | None = None, **sizes: int) -> dict[str, int]:
    """
    Log fields: C{ms} (milliseconds) and byte counts, blurred when C{blur}
    is set, exact otherwise.
    """
    fields: dict[str, int] = {}
    if ms is not None:
        fields["ms"] = blurMs(ms) if blur else round(ms)
    for name, value in sizes.items():
        fields[name] = blurBytes(value) if blur else int(value)
    return fields


@implementer(ILogObserver)
class BufferedLogObserver:
    """
    Formats events as they come (from any thread) and writes them to
    C{outFile} in order: from a daemon thread every C{interval} seconds; at
    once for warnings and errors, while C{immediate()} is true, or once
    C{maxPending} characters wait; and at exit.
    """

    def __init__(
        self,
        outFile: IO[Any],
        formatEvent: Callable[[dict[str, Any]], str | None],
        interval: float = FLUSH_INTERVAL,
        maxPending: int = MAX_PENDING,
        immediate: Callable[[], bool] = lambda: False,
    ) -> None:
        self._out = outFile
        self._format = formatEvent
        self._immediate = immediate
        self._interval = interval
        self._maxPending = maxPending
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._size = 0
        self._writer = self._startWriter()
        # twistd may fork to daemonise after making its observer. Only the
        # forking thread survives a fork: the child gets a fresh lock (the
        # writer may have held it) and, at its first event, a new writer.
        os.register_at_fork(after_in_child=self._afterFork)
        atexit.register(self.flush)

    def _startWriter(self) -> threading.Thread:
        writer = threading.Thread(target=self._writeLoop, name="privox-log-writer", daemon=True)
        writer.start()
        return writer

    def _afterFork(self) -> None:
        self._lock = threading.Lock()

    def _writeLoop(self) -> None:
        idle = threading.Event()  # never set: a wait that no signal cuts short
        while True:
            idle.wait(self._interval)
            self.flush()

    def __call__(self, event: dict[str, Any]) -> None:
        text = self._format(event)
        if not text:
            return
        if not self._writer.is_alive():
            self._writer = self._startWriter()
        with self._lock:
            self._pending.append(text)
            self._size += len(text)
            full = self._size >= self._maxPending
        if full or event.get("log_level") in _URGENT or self._immediate():
            self.flush()

    def flush(self) -> None:
        """
        Write everything waiting, now.
        """
        with self._lock:
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending = []
            self._size = 0
            try:
                self._out.write(text)
                self._out.flush()
            except (OSError, ValueError):
                # A closed or broken output: there is nowhere to say so.
                pass


class ClassicText:
    """
    L{formatEventAsClassicLogText}: the same text, nine times faster for the
    events daemons log most (bench/log_format.py).

    Twisted formats C{log_format} with L{string.Formatter}, in Python, so it
    can call C{{name()}} fields, and formats the time stamp afresh for every
    line. That cost a farm a tenth of its CPU per small job. Here
    C{str.format_map} does the fields and the stamp is reused within its
    second. Anything else (a failure to show, a flattened or bytes format,
    a call, a field that is missing or will not format, a system that is
    not text) goes to Twisted's own function, so it reads as it always has.
    """

    def __init__(self) -> None:
        # (second, stamp) in one tuple: events may come from several threads.
        self._stamp: tuple[int | None, str] = (None, "-")

    def _timeStamp(self, when: Any) -> str:
        if type(when) is not float:
            return formatTime(when)
        # RFC 3339 to the second: the same text for the whole second.
        second = int(when // 1)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, formatTime(when))
        return stamp[1]

    def __call__(self, event: dict[str, Any]) -> str | None:
        logFormat = event.get("log_format")
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = "{}#{}".format(
                event.get("log_namespace", "-"), "-" if level is None else level.name
            )
        if (
            type(logFormat) is not str
            or type(system) is not str
            or "log_failure" in event
            or "log_flattened" in event
        ):
            return formatEventAsClassicLogText(event)
        try:
            text = logFormat.format_map(event)
        except Exception:
            text = None
        if text is None:
            # Outside the except: Twisted's own report of an event it cannot
            # format must not chain ours.
            return formatEventAsClassicLogText(event)
        if not text:
            return None
        line = "".join((self._timeStamp(event.get("log_time")), " [", system, "] ", text))
        return line.replace("\n", "\n\t") + "\n"


def _json(event: dict[str, Any]) -> str:
    return eventAsJSON(event) + "\n"


def _forTwistd(outFile: IO[Any], formatEvent: Callable[[dict[str, Any]], str | None]) -> ILogObserver:
    # twistd has installed its reactor before it asks for the observer.
    from twisted.internet import reactor

    return BufferedLogObserver(outFile, formatEvent, immediate=lambda: not reactor.running)


def textStdout() -> ILogObserver:
    """
    A log observer factory for C{twistd --logger}: text lines on stdout.
    """
    return _forTwistd(sys.stdout, ClassicText())


def jsonStdout() -> ILogObserver:
    """
    A log observer factory for C{twistd --logger}: JSON lines on stdout.
    """
    return _forTwistd(sys.stdout, _json)


def jsonFile(path: str = "privox.log.json") -> ILogObserver:
    """
    A log observer factory for C{twistd --logger}: JSON lines appended to
    C{path}.
    """
    return _forTwistd(io.open(path, "a", encoding="utf-8"), _json)
