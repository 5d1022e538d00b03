"""
Structured logs for the daemons: C{twistd --logger privox.logs.jsonStdout}
writes every log event as one JSON object per line (Twisted's
C{jsonFileLogObserver}) to stdout, for journald or a log shipper. The
events carry the same named fields as the text lines (route, status, model,
sizes, milliseconds, key ids); with C{--blur-usage} sizes and times are
rounded in both.

C{privox.logs.jsonFile} does the same into C{privox.log.json} in the
working directory.
"""

from __future__ import annotations

import io
import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def jsonStdout() -> ILogObserver:
    """
    A log observer factory for C{twistd --logger}: JSON lines on stdout.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


def jsonFile(path: str = "privox.log.json") -> ILogObserver:
    """
    A log observer factory for C{twistd --logger}: JSON lines appended to
    C{path}.
    """
    return jsonFileLogObserver(io.open(path, "a", encoding="utf-8"), recordSeparator="")
