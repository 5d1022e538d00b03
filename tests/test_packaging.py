"""
A real install into a fresh virtual environment puts the privox-farm plugin
where twistd finds it (the flat-layout trap: twisted/plugins must ship).
"""

from __future__ import annotations

import os
import sys

from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

ROOT = FilePath(__file__).parent().parent()


async def run(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=env, path="/")
    if code != 0:
        raise AssertionError(f"{argv} exited {code}:\n{out.decode()}\n{err.decode()}")
    return out.decode()


class FreshInstallTests(TestCase):
    timeout = 600

    async def _install(self) -> None:
        venv = FilePath(self.mktemp())
        await run(sys.executable, "-m", "venv", venv.path)
        bin = venv.child("bin")
        await run(bin.child("pip").path, "install", "--quiet", ROOT.path)
        helpText = await run(bin.child("twistd").path, "--help")
        self.assertIn("privox-farm", helpText)
        farmHelp = await run(bin.child("twistd").path, "privox-farm", "--help")
        for option in ("--stt-listen", "--tts-listen", "--queue-timeout", "--config"):
            self.assertIn(option, farmHelp)

    def test_twistdListsPlugin(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._install())
