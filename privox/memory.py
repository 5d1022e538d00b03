"""
Giving back the memory big buffers used.

glibc's malloc raises its mmap threshold every time a large block allocated
with mmap is freed (up to 32 MB), so after one 100 MB upload the megabyte
pieces of the next ones come from the heap instead, and a heap is returned
to the system only from its top: the API went from 70 to 172 MB after one
such upload and stayed there. L{tuneMalloc} fixes the threshold, so any
block over it (128 KiB) is its own mapping and is unmapped when freed,
trims the heap when its free top passes 4 MB (the records of a sealed
upload, 64 KiB each, a MB of them freed at once, are not given back and
taken again per upload), and keeps to two arenas however many threads
parse and measure uploads. Measured on the API (tests/test_attack):
RSS back within a few MB of where it was after 100 MB uploads.

The API calls it as it starts. The farm does not: it reads its sockets
into 512 KiB buffers, each of which would then be a mapping of its own (a
system call or two a read, 150 us a small job in bench/farm_relay.py). Nor
does privox-local.

The node tunes the other way (L{NODE}): its size is its models', and its
engines allocate and free large arrays all the time, as it does the pieces
of every upload (512 KiB reads, and for a sealed upload their plaintext).
Left to itself, glibc's malloc trims its heap as soon as a megabyte at its
top is free, and grows it again for the next piece: page faults for every
MB relayed. L{NODE} sets, from the start, the thresholds a busy heap ends
up with (mmap for blocks of 32 MB and more) and keeps up to 64 MB of free
heap instead of trimming it: in bench/sealing.py (part 4) the node's CPU
per MB fell by about a third, clear or sealed.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@dataclass(frozen=True)
class MallocTuning:
    mmapThreshold: int
    trimThreshold: int
    #: At most this many arenas; None: malloc's own limit.
    arenas: int | None


#: The API's: big buffers given back as soon as they are freed.
API = MallocTuning(128 * 1024, 4 * 1024 * 1024, 2)
#: The node's: the heap kept, not trimmed and grown again per upload.
NODE = MallocTuning(32 * 1024 * 1024, 64 * 1024 * 1024, None)


def tuneMalloc(tuning: MallocTuning = API) -> bool:
    """
    Set glibc malloc's thresholds (see the module docstring).

    @return: whether they were set (False where malloc is not glibc's).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = [
        (_M_MMAP_THRESHOLD, tuning.mmapThreshold),
        (_M_TRIM_THRESHOLD, tuning.trimThreshold),
    ]
    if tuning.arenas is not None:
        settings.append((_M_ARENA_MAX, tuning.arenas))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


class TunedMallocService(Service):
    """
    Tunes malloc when the daemon starts (see L{tuneMalloc}).
    """

    def __init__(self, tuning: MallocTuning = API) -> None:
        self.tuning = tuning

    def startService(self) -> None:
        super().startService()
        if not tuneMalloc(self.tuning):
            log.info("not glibc's malloc: freed buffers are returned as it sees fit")
