"""
L{privox.logs.ClassicText}: the text twistd's own log would have, faster.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel, Logger, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from privox.logs import ClassicText


class _Thing:
    size = 7

    def __repr__(self) -> str:
        return "<thing>"

    def name(self) -> str:
        return "called"


class _Unprintable:
    def __str__(self) -> str:
        raise ValueError("no")

    __repr__ = __str__


def _events() -> list[dict[str, Any]]:
    """
    What a daemon logs, and what else an observer may be handed.
    """
    events: list[dict[str, Any]] = []
    log = Logger(namespace="privox.test", observer=events.append)
    log.info(
        "job {job_id} {service} {model} {outcome} in {ms} ms ({bytes_in} bytes in)",
        job_id="ab12cd34ef56", service="stt", model="whisper:tiny.en", outcome="ok",
        ms=12.345678, bytes_in=1024,
    )
    log.warn("spec {n:08.3f} conversions {t!r} {t!s} {t!a} attribute {t.size}", n=3.25, t=_Thing())
    log.error("indexing {d[k]} {l[1]} escapes {{literal}} unicode {u}", d={"k": "v"}, l=[1, 2], u="naïve ✓")
    log.info("a call {t.name()} goes Twisted's way", t=_Thing())
    log.info("a missing {field}")
    log.info("a positional {} field")
    log.info("unprintable {x}", x=_Unprintable())
    log.info("two\nlines {a}", a="and\nthree")
    log.info("")
    log.debug("nested spec {n:{width}}", n=5, width=4)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("it failed {why}", Failure(), why="badly")
    events.append({"log_format": "no time, namespace or level"})
    events.append({"log_format": b"bytes format {x}", "x": 1, "log_time": 1.5e9})
    events.append({"log_format": None, "log_time": 1.5e9})
    events.append({"log_time": 1.5e9})
    events.append({"log_format": "legacy {log_text}", "log_text": "hi", "log_system": "HTTPChannel,3,127.0.0.1",
                   "log_time": 1.5e9, "log_level": LogLevel.info})
    events.append({"log_format": "odd system", "log_system": 42, "log_time": 1.5e9})
    events.append({"log_format": "odd system", "log_system": _Unprintable(), "log_time": 1.5e9})
    events.append({"log_format": "integer time", "log_time": 1500000000})
    events.append({"log_format": 42, "log_time": 1.5e9})
    return events


class ClassicTextTests(SynchronousTestCase):
    def test_sameAsTwisted(self) -> None:
        """
        Every event reads exactly as L{formatEventAsClassicLogText} has it,
        the unusual ones included (they go to it).
        """
        classic = ClassicText()
        for event in _events():
            self.assertEqual(classic(event), formatEventAsClassicLogText(event), event.get("log_format"))

    def test_timeStampPerSecond(self) -> None:
        """
        The stamp is reused within its second and made afresh for the next.
        """
        classic = ClassicText()
        base = 1_700_000_000.0
        for when in (base + 0.1, base + 0.9, base + 1.0, base + 0.5, base + 3601.25):
            event = {"log_format": "tick", "log_time": when, "log_system": "-"}
            self.assertEqual(classic(event), formatEventAsClassicLogText(event))
