"""
Giving back the memory big buffers used.

glibc's malloc raises its mmap threshold every time a large block allocated
with mmap is freed (up to 32 MB), so after one 100 MB upload the megabyte
pieces of the next ones come from the heap instead, and a heap is returned
to the system only from its top: the API went from 70 to 172 MB after one
such upload and stayed there. L{tuneMalloc} fixes the threshold, so any
block over it is its own mapping and is unmapped when freed, trims the heap
when its free top passes a megabyte, and keeps to two arenas however many
threads parse and measure uploads. Measured on the API (tests/test_attack):
RSS back within a few MB of where it was after 100 MB uploads.

The API calls it as it starts. The farm does not: it reads its sockets
into 512 KiB buffers, each of which would then be a mapping of its own (a
system call or two a read, 150 us a small job in bench/farm_relay.py). Nor
do the node and privox-local: their engines allocate and free large arrays
all the time, and their size is their models'.
"""

from __future__ import annotations

import ctypes

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tuneMalloc(
    mmapThreshold: int = 128 * 1024, trimThreshold: int = 1024 * 1024, arenas: int = 2
) -> bool:
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
    return all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, mmapThreshold),
            (_M_TRIM_THRESHOLD, trimThreshold),
            (_M_ARENA_MAX, arenas),
        )
    )


class TunedMallocService(Service):
    """
    Tunes malloc when the daemon starts (see L{tuneMalloc}).
    """

    def startService(self) -> None:
        super().startService()
        if not tuneMalloc():
            log.info("not glibc's malloc: freed buffers are returned as it sees fit")
