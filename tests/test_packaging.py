"""
A real install into a fresh virtual environment puts the privox-farm plugin
where twistd finds it (the flat-layout trap: twisted/plugins must ship), and
ships every file of the package that is not Python (the try-it page, the
account store's migrations).
"""

from __future__ import annotations

import os
import sys

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

    async def test_twistdListsPlugin(self) -> None:
        venv = FilePath(self.mktemp())
        await run(sys.executable, "-m", "venv", venv.path)
        bin = venv.child("bin")
        await run(bin.child("pip").path, "install", "--quiet", ROOT.path)
        helpText = await run(bin.child("twistd").path, "--help")
        self.assertIn("privox-farm", helpText)
        farmHelp = await run(bin.child("twistd").path, "privox-farm", "--help")
        for option in ("--stt-listen", "--tts-listen", "--queue-timeout", "--config"):
            self.assertIn(option, farmHelp)

        # Data files: what setup.py's package_data must list.
        site = FilePath((await run(
            bin.child("python").path, "-c", "import privox, os; print(os.path.dirname(privox.__file__))"
        )).strip())
        package = ROOT.child("privox")
        data = [
            path.segmentsFrom(package)
            for path in package.walk()
            if path.isfile() and path.splitext()[1] not in (".py", ".pyc")
            and "__pycache__" not in path.segmentsFrom(package)
        ]
        self.assertIn(["accounts", "migrations", "0001_accounts.sql"], data)
        missing = ["/".join(s) for s in data if not site.descendant(s).exists()]
        self.assertEqual(missing, [], "package files the install left out")
        # And the store that needs them works from the install.
        accounts = "sqlite:" + FilePath(self.mktemp()).path
        created = await run(bin.child("privox").path, "keys", "create", "--accounts", accounts)
        self.assertTrue(created.strip().splitlines()[-1].startswith("pvx_"))
