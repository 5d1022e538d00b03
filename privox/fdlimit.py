"""
The open-file limit of a daemon that holds a descriptor per peer.

systemd (and most login shells) start processes with a soft RLIMIT_NOFILE of
1024 and a much higher hard limit (524288 under systemd). Left alone, that
caps a farm at about a thousand peers, whatever its memory allows. A process
may raise its own soft limit up to the hard one, as Go programs do by
default; the farm and the API do so when they start. The hard limit stays
the administrator's: C{LimitNOFILE=} in the unit.
"""

from __future__ import annotations

import resource

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

#: Below this, a farm or an API can't take the load issue 9 measures
#: (10,000 idle producers); say so at start-up.
ENOUGH = 16384


def _ceiling() -> int:
    # Linux refuses RLIMIT_NOFILE above fs.nr_open, "unlimited" included.
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raiseOpenFileLimit() -> tuple[int, int]:
    """
    Raise this process's soft open-file limit to its hard limit.

    @return: the soft limit before and after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ceiling() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


class OpenFileLimitService(Service):
    """
    Raises the limit when started: add it before the ports.
    """

    def startService(self) -> None:
        super().startService()
        before, after = raiseOpenFileLimit()
        if after > before:
            log.info("open-file limit raised from {before} to {after}", before=before, after=after)
        if after < ENOUGH:
            log.warn(
                "open-file limit is {limit}: at most about that many peers at once; "
                "raise LimitNOFILE (or ulimit -Hn)",
                limit=after,
            )
