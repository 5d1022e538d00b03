"""
L{privox.memory}: glibc malloc tuned as each daemon starts.
"""

from __future__ import annotations

import platform

from twisted.trial.unittest import SynchronousTestCase

from privox.memory import API, NODE, tuneMalloc


class TuneMallocTests(SynchronousTestCase):
    def test_profilesTakeEffect(self) -> None:
        """
        glibc accepts both profiles' values (mallopt refuses a threshold
        past its limits, 32 MB for mmap on 64-bit); any other malloc is
        left alone, and says so.
        """
        glibc = platform.libc_ver()[0] == "glibc"
        self.assertEqual(tuneMalloc(NODE), glibc)
        self.assertEqual(tuneMalloc(API), glibc)
